#!/bin/sh
# Run by tests/packaging/test_deb.py inside the CUSE VM (tools/cuse-vm), whose
# root is the host's under a RAM overlay: in the cached Debian unstable tree
# (tests/packaging/deb-chroot.sh; the VM's writes never reach the host), the
# package's daemon serves /dev/dtrace/helper as a CUSE device to a program
# built with dtrace -G; after `apt-get purge dtprobed-py`, upstream's daemon
# (libdtrace2's, back from the diversion) serves it. No systemd here: the
# daemons are started by hand, as the unit would (dtprobed -F).
#
#   sh deb-cuse-guest.sh ROOT WORK     WORK holds the .deb and usdtprog; the
#                                      logs go there. Last line: "ok" or the failure.
set -eu
R=$1
W=$2
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
fail() { say "FAIL: $*"; exit 1; }
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
cp "$W"/dtprobed-py_*.deb "$W/usdtprog" "$R/tmp/"
deb=$(cd "$R/tmp" && ls dtprobed-py_*.deb)
run_in() {
    exec chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DEBIAN_FRONTEND=noninteractive "$@"
}

serve() {  # NAME: start /usr/sbin/dtprobed, register usdtprog through it, stop it
    name=$1
    [ ! -e "$R/dev/dtrace/helper" ] || fail "$name: /dev/dtrace/helper exists before the daemon"
    (run_in /usr/sbin/dtprobed -F) >"$W/$name.log" 2>&1 &
    daemon=$!
    for _ in $(seq 1 900); do [ -c "$R/dev/dtrace/helper" ] && break; sleep 0.1; done
    [ -c "$R/dev/dtrace/helper" ] || { cat "$W/$name.log"; fail "$name: no CUSE device"; }
    say "$name: pid $daemon ($(tr '\0' ' ' <"/proc/$daemon/cmdline")) serves $(stat -c '%F' "$R/dev/dtrace/helper")"
    sleep 2  # upstream's daemon creates the device before it serves
    (sleep 6; echo q) | (run_in /tmp/usdtprog) >"$W/$name.prog" 2>&1 &
    prog=$!
    pid=
    for _ in $(seq 1 100); do
        pid=$(sed -n 's/^\([0-9]*\) ready$/\1/p' "$W/$name.prog")
        [ -z "$pid" ] || break
        sleep 0.1
    done
    [ -n "$pid" ] || fail "$name: usdtprog did not start: $(cat "$W/$name.prog")"
    for _ in $(seq 1 50); do [ -d "$R/run/dtrace/stash/dof-pid/$pid" ] && break; sleep 0.1; done
    [ -d "$R/run/dtrace/stash/dof-pid/$pid" ] \
        || { cat "$W/$name.prog" "$W/$name.log"; fail "$name: usdtprog $pid not in the stash"; }
    ! grep -q 'DRTI: Ioctl failed' "$W/$name.prog" || fail "$name: DRTI: Ioctl failed"
    say "$name: usdtprog $pid registered (stash/dof-pid/$pid)"
    wait "$prog" || true
    kill -TERM "$daemon"
    wait "$daemon" || true
    for _ in $(seq 1 100); do [ -e "$R/dev/dtrace/helper" ] || break; sleep 0.1; done
    [ ! -e "$R/dev/dtrace/helper" ] || fail "$name: the device outlived its daemon"
}

say "apt-get install ./$deb (python3 with it; no systemd: nothing started)"
(run_in apt-get install -y -q "/tmp/$deb") >"$W/install.log" 2>&1 || { tail "$W/install.log"; fail "install"; }
[ "$(head -n1 "$R/usr/sbin/dtprobed")" = "#!/usr/lib/dtprobed-py/venv/bin/python3 -I" ] \
    || fail "/usr/sbin/dtprobed is not ours"
serve ours
grep -q "registered generation 0" "$W/ours.log" || fail "ours did not log the registration"

say "apt-get purge dtprobed-py"
(run_in apt-get purge -y -q dtprobed-py) >"$W/purge.log" 2>&1 || { tail "$W/purge.log"; fail "purge"; }
sum=$(md5sum "$R/usr/sbin/dtprobed" | cut -d' ' -f1)
grep -qx "$sum  usr/sbin/dtprobed" "$R/var/lib/dpkg/info/libdtrace2.md5sums" \
    || fail "/usr/sbin/dtprobed is not libdtrace2's"
serve upstream
say ok
