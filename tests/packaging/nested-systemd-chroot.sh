#!/usr/bin/env bash
# Boot a private systemd (pid 1 of a new pid namespace) whose root is an
# overlay of the Debian unstable chroot (tests/packaging/deb-chroot.sh), for
# tests/packaging/test_deb.py.
#
# Run as:
#   unshare --pid --fork --mount --cgroup --propagation private \
#       bash nested-systemd-chroot.sh LOWER WORK_DIR
# after moving itself into a fresh cgroup of the cgroup2 hierarchy. LOWER (the
# cached chroot) is only read: every write goes to WORK_DIR/upper, so booting
# again with the same WORK_DIR is a reboot of the same machine (its /etc and
# /var kept; /run, /tmp and /dev fresh). WORK_DIR itself appears as
# /run/dtprobed-test. Nothing reaches the host: every mount is in this mount
# namespace, the helper device and the stash are this machine's own.
set -euo pipefail
lower=$1
work=$2
root=$work/merged

mkdir -p "$work/upper" "$work/ovl-work" "$root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$work/upper,workdir=$work/ovl-work" "$root"

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
# What the real dtrace needs (tests/realdtrace/README.md): tracefs, and debugfs
# (2.0.7 hard-codes /sys/kernel/debug/tracing).
mount -t tracefs nodev "$root/sys/kernel/tracing"
mount -t debugfs nodev "$root/sys/kernel/debug"

# A private /dev with the nodes the daemon (FUSE), systemd and the programs need.
mount -t tmpfs -o mode=0755 tmpfs "$root/dev"
for node in null zero full random urandom tty fuse; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/shm" "$root/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"

mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mkdir -p "$root/run/dtprobed-test"
mount --bind "$work" "$root/run/dtprobed-test"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true

# pivot_root, not chroot: the overlay must be the root of this mount namespace,
# since the daemon mounts its FUSE helper in pid 1's namespace (setns), whose
# root that gives it. The host's tree goes.
mkdir -p "$root/run/old-root"
cd "$root"
pivot_root . run/old-root
umount -l /run/old-root
rmdir /run/old-root
exec /usr/bin/env -i container=dtprobed-test \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /usr/lib/systemd/systemd --system --unit=multi-user.target --log-target=console \
    --log-level=info --show-status=no
