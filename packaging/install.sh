#!/usr/bin/env bash
# Install dtprobed-py as a system service and start it.
#
# Usage: bash packaging/install.sh [--root DIR] [--prefix PREFIX] [--python PYTHON] [--no-start]
#
#   --root DIR      stage the installation under DIR (for packagers and tests); implies
#                   --no-start. Paths written into files are the final ones, without DIR.
#   --prefix PREFIX installation prefix (default /usr/local); see packaging/paths.sh and
#                   docs/operations.md for every path.
#   --python PY     the interpreter the service runs on (default /usr/bin/python3; >= 3.11)
#   --no-start      install files only.
#
# Running it again upgrades in place and restarts the daemon (the stash in /run/dtrace
# is kept and reparsed by the new daemon where its format is outdated).
#
# Start-up: when systemd is pid 1, `systemctl enable --now`. Otherwise (containers)
# the daemon is started directly in the background, logging to /var/log/dtprobed.log,
# with its pid in /run/dtprobed.pid; nothing restarts it after a reboot.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
# shellcheck source=packaging/paths.sh
. "$here/paths.sh"

root=""
prefix=/usr/local
python=""
start=yes

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python=$2; shift 2 ;;
        --python=*) python=${1#--python=}; shift ;;
        --no-start) start=no; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

case $prefix in /*) ;; *) die "--prefix must be an absolute path" ;; esac
prefix=${prefix%/}
[ -n "$prefix" ] || die "--prefix / is not supported; use /usr"
if [ -n "$root" ]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || root=""
fi
[ -z "$root" ] || start=no
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    die "must run as root (or stage with --root DIR)"
fi

dtprobed_paths "$prefix"

# --- The interpreter -------------------------------------------------------------
# The system interpreter, not whatever python3 comes first in PATH (a pyenv
# shim in root's home is no base for a boot-time service).
if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3 || true); fi
fi
[ -n "$python" ] && [ -x "$python" ] || die "no python3 found; install it (Debian/Ubuntu: apt-get install python3 python3-venv; Fedora: dnf install python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is older than 3.11"
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    if command -v apt-get >/dev/null && [ -z "$root" ]; then
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
    else
        die "$python lacks venv/ensurepip (Debian/Ubuntu: apt-get install python3-venv)"
    fi
fi

# --- The Python package, in its own virtual environment --------------------------
venv=$root$venv_dir
say "installing the package into $venv_dir"
"$python" -m venv "$venv"
# PIP_* variables (index, proxy) pass through; the build happens in a copy
# so the checkout gets no build/ directory.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
(cd "$src" && tar --exclude=./.venv --exclude=./.git --exclude='*.egg-info' --exclude=./build \
    --exclude=__pycache__ --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
    -cf - .) | tar -C "$build" -xf -
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    --upgrade --force-reinstall "$build"

# --- Entry points ------------------------------------------------------------------
# Written here rather than taken from pip: they must name the interpreter by its
# final path (pip's scripts would name $root/... in a staged install). -I keeps
# PYTHONPATH and the user site out of a root daemon.
write_entry_point() {  # name target-dir module function
    local dest=$root$2/$1
    mkdir -p "$root$2"
    cat >"$dest.tmp" <<EOF
#!$venv_dir/bin/python3 -I
# $1, installed by dtprobed-py's packaging/install.sh.
import sys

from $3 import $4

sys.exit($4())
EOF
    chmod 0755 "$dest.tmp"
    mv -f "$dest.tmp" "$dest"
}
# [project.scripts] of pyproject.toml is the source of the names and targets.
scripts=$("$python" - "$src/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
for name, target in scripts.items():
    module, function = target.split(":")
    print(name, module, function)
EOF
)
while read -r name module function; do
    case $name in
        dtprobed) write_entry_point "$name" "$sbin_dir" "$module" "$function" ;;
        *) write_entry_point "$name" "$bin_dir" "$module" "$function" ;;
    esac
    # pip's copy names the staging path in a --root install: only ours stays.
    rm -f "$venv/bin/$name"
done <<<"$scripts"

# --- systemd, udev, man pages, docs --------------------------------------------------
install_file() {  # mode source destination-dir [name]
    local dir=$root$3
    mkdir -p "$dir"
    install -m "$1" "$2" "$dir/${4:-$(basename "$2")}"
}
mkdir -p "$root$unit_dir"
sed "s|@SBINDIR@|$sbin_dir|g" "$here/dtprobed.service.in" >"$root$unit_dir/dtprobed.service.tmp"
chmod 0644 "$root$unit_dir/dtprobed.service.tmp"
mv -f "$root$unit_dir/dtprobed.service.tmp" "$root$unit_dir/dtprobed.service"
install_file 0644 "$here/dtrace-usdt.target" "$unit_dir"
install_file 0644 "$here/50-dtprobed.preset" "$preset_dir"
install_file 0644 "$here/60-dtprobed.rules" "$udev_rules_dir"
install_file 0644 "$src/docs/man/dtprobed.8" "$man_dir/man8"
install_file 0644 "$src/docs/man/dtprobed-parse.1" "$man_dir/man1"
install_file 0644 "$src/docs/man/dtprobed-stash.1" "$man_dir/man1"
install_file 0644 "$src/README.md" "$doc_dir"
for doc in "$src"/docs/*.md; do
    [ ! -e "$doc" ] || install_file 0644 "$doc" "$doc_dir"
done
say "installed: $sbin_dir/dtprobed, $bin_dir/dtprobed-parse, $bin_dir/dtprobed-stash, $unit_dir/dtprobed.service"

[ "$start" = yes ] || { say "not starting the daemon (--no-start or --root)"; exit 0; }

# --- Start -----------------------------------------------------------------------------
if [ -d /run/systemd/system ]; then
    # systemd is pid 1 (the sd_booted() test).
    systemctl daemon-reload
    if command -v udevadm >/dev/null; then udevadm control --reload || true; fi
    systemctl enable dtprobed.service
    # restart, not start: a reinstall must run the new code.
    systemctl restart dtprobed.service
    systemctl --no-pager --lines=0 status dtprobed.service || true
    systemctl is-active --quiet dtprobed.service || die "dtprobed.service did not start: journalctl -u dtprobed"
    say "dtprobed.service is enabled and running (logs: journalctl -u dtprobed)"
    exit 0
fi

say "systemd is not pid 1: starting $sbin_dir/dtprobed directly (logs: $log_file)"
# The old daemon, whichever checkout installed it (pid file, else its command line).
bash "$here/uninstall.sh" --stop-only --prefix "$prefix"
mkdir -p "$state_dir" "$(dirname "$log_file")"
chmod 0755 "$state_dir"

# --- The state directory on tmpfs ----------------------------------------------------
# Upstream assumes /run is a tmpfs, as under systemd; here (containers, chroots)
# it may be a disk, where every stash file costs a journalled update (~25 times
# tmpfs's). Give the stash a tmpfs of its own unless it is in memory already.
# Its limits follow the stash quotas, so the daemon's EDQUOT comes before the
# file system's ENOSPC: one 4 KiB page and up to two inodes (a per-probe file
# and, at worst, its own probes/ directory) per probe of --max-probes-total,
# plus room for raw DOF copies and per-process files. A tmpfs uses memory only
# for what it holds. It survives daemon restarts and reinstalls, not a reboot.
if dtprobed_in_memory "$state_dir"; then
    say "$state_dir is on $(stat -f -c %T "$state_dir"): kept as it is"
else
    max_probes_total=$("$venv/bin/python" -I -c \
        'from common.stash_protocol import DEFAULT_MAX_PROBES_TOTAL as n; print(n)')
    size_mib=$((max_probes_total * 4 / 1024 + 256))
    nr_inodes=$((max_probes_total * 2 + 65536))
    fresh=$(mktemp -d "$(dirname "$state_dir")/.dtprobed-tmpfs.XXXXXX")
    mount -t tmpfs -o "mode=0755,size=${size_mib}m,nr_inodes=$nr_inodes" \
        "$state_tmpfs_source" "$fresh"
    if [ -n "$(ls -A "$state_dir")" ]; then
        # A stash an earlier daemon left on the disk: registrations of programs
        # still running. Move it over (hard links, xattrs and all; no daemon runs).
        say "moving the stash in $state_dir onto the tmpfs"
        cp -a "$state_dir/." "$fresh/"
        find "$state_dir" -mindepth 1 -delete
    fi
    mount --bind "$fresh" "$state_dir"
    umount "$fresh"
    rmdir "$fresh"
    say "mounted a tmpfs on $state_dir (size=${size_mib}m, nr_inodes=$nr_inodes:" \
        "from --max-probes-total $max_probes_total; uninstall.sh --purge unmounts it)"
fi

# --- Start ---------------------------------------------------------------------------
# setsid: its own session, so it outlives this shell and its terminal.
# A clean environment, as systemd would give it. --ready-fd: the daemon writes
# one byte once it serves the helper and has pruned and reparsed the stash.
ready=$(mktemp -u /run/.dtprobed-ready.XXXXXX)
mkfifo -m 0600 "$ready"
# Both ends opened here, before the daemon starts: read-write for us (opening
# it waits for no one), write-only for the daemon (fd 3); then the name goes.
exec 4<>"$ready" 3>"$ready"
rm -f "$ready"
setsid env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$sbin_dir/dtprobed" -F --ready-fd 3 \
    </dev/null >>"$log_file" 2>&1 4<&- &
pid=$!
exec 3>&-
echo "$pid" >"$pid_file"

served() {
    # The CUSE character device, or a FUSE file system on the helper path itself
    # (by path, not by /proc/self/mountinfo, which also lists covered mounts).
    [ -c "$helper_path" ] || [ "$(stat -f -c %t "$helper_path" 2>/dev/null)" = 65735546 ]
}
for _ in $(seq 1 120); do
    if read -r -n 1 -t 1 -u 4 _; then
        exec 4<&-
        served || die "dtprobed (pid $pid) said it was ready but $helper_path is not served"
        say "dtprobed is running (pid $pid) and serving $helper_path"
        exit 0
    fi
    # (our child: once dead it is a zombie, which kill -0 would still find)
    if [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" = Z ] \
        || [ ! -e "/proc/$pid" ]; then
        rm -f "$pid_file"
        tail -n 20 "$log_file" >&2 || true
        die "dtprobed exited during start-up (log above, from $log_file)"
    fi
done
tail -n 20 "$log_file" >&2 || true
die "dtprobed (pid $pid) is running but not ready after 120 s"
