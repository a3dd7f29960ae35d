#!/usr/bin/env bash
# Run a command as if on a fresh host of this machine kind (no systemd as pid 1),
# without touching the real one.
#
# Run by tests/packaging/test_fresh_install.py as:
#   unshare --pid --fork --mount --propagation private --mount-proc \
#       bash fresh-host.sh WORK_DIR
# It is pid 1 of its pid namespace (so the daemon's "mount in pid 1's mount
# namespace" lands here), and every place install.sh writes is private: /usr/local,
# /var/log and /tmp are empty tmpfs mounts, /run is an empty directory of
# WORK_DIR (on disk, not tmpfs, like this machine kind's /run), /etc is an
# overlay whose writes go to WORK_DIR, and /dev holds only the nodes needed (so
# /dev/dtrace/helper is not the host's, even when the host's own dtprobed
# serves it: see detach_inherited). WORK_DIR appears as /run/dtprobed-test.
set -euo pipefail
work=$1

. "$(dirname "$0")/private-host.sh"
hold_repository

mkdir -p "$work/etc-upper" "$work/etc-work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$work/etc-upper,workdir=$work/etc-work" /etc
mount -t tmpfs -o mode=0755 tmpfs /usr/local
mount -t tmpfs -o mode=0755 tmpfs /var/log
private_run_and_tmp "$work" disk

private_dev

restore_repository

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
