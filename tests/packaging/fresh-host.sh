#!/usr/bin/env bash
# Run a command as if on a fresh host of this machine kind (no systemd as pid 1),
# without touching the real one.
#
# Run by tests/packaging/test_fresh_install.py as:
#   unshare --pid --fork --mount --propagation private --mount-proc \
#       bash fresh-host.sh WORK_DIR
# It is pid 1 of its pid namespace (so the daemon's "mount in pid 1's mount
# namespace" lands here), and every place install.sh writes is private: /usr/local,
# /run, /var/log and /tmp are empty tmpfs mounts, /etc is an overlay whose writes
# go to WORK_DIR, and /dev holds only the nodes needed (so /dev/dtrace/helper is
# not the host's). WORK_DIR appears as /run/dtprobed-test.
set -euo pipefail
work=$1

# The repository (and the venv in it) is where the tests run from; CI may have
# cloned it below a directory hidden here (e.g. /tmp). Keep a handle on it and
# bind it back at the same path once the private mounts are in place.
repo=$(cd "$(dirname "$0")/../.." && pwd)
exec 9<"$repo"

mkdir -p "$work/etc-upper" "$work/etc-work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$work/etc-upper,workdir=$work/etc-work" /etc
mount -t tmpfs -o mode=0755 tmpfs /usr/local
mount -t tmpfs -o mode=0755 tmpfs /var/log
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/dtprobed-test
mount --bind "$work" /run/dtprobed-test
mount -t tmpfs -o mode=1777 tmpfs /tmp

hostdev=$(mktemp -d /run/hostdev.XXXXXX)
mount --bind /dev "$hostdev"
mount -t tmpfs -o mode=0755 tmpfs /dev
for node in null zero full random urandom tty fuse; do
    touch "/dev/$node"
    mount --bind "$hostdev/$node" "/dev/$node"
done
mkdir /dev/shm /dev/pts
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
umount -l "$hostdev"
rmdir "$hostdev"

if [ ! -e "$repo/pyproject.toml" ]; then
    mkdir -p "$repo"
    # --no-canonicalize: resolving the fd link would name the hidden path
    mount --no-canonicalize --bind "/proc/$$/fd/9" "$repo"
fi
exec 9<&-

# Stay as pid 1 and reap orphans (the daemon install.sh starts with setsid is
# adopted by us); the test runs its commands with nsenter and ends everything
# by killing this process.
echo "fresh-host: ready"
exec /usr/bin/python3 -c '
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
'
