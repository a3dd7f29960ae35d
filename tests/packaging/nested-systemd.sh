#!/usr/bin/env bash
# Boot a private systemd (pid 1 of a new pid namespace) that sees a staged
# dtprobed-py installation as if it were installed on the host.
#
# Run by tests/packaging/test_systemd.py as:
#   unshare --pid --fork --mount --cgroup --propagation private --mount-proc \
#       bash nested-systemd.sh STAGE_ROOT|none WORK_DIR hybrid|unified
# (none: nothing installed; the test runs packaging/install.sh in there)
# after moving itself into a fresh cgroup. Everything it changes is in its own
# mount namespace: /run, /tmp, /dev, /etc/systemd/system and systemd's unit
# directory are private tmpfs mounts, so nothing reaches the host (no
# tmpfiles run, no host units start, the helper device and the stash are
# private). WORK_DIR (the test's files) appears as /run/dtprobed-test.
set -euo pipefail
stage=$1
work=$2
cgroup_layout=$3  # hybrid (name=systemd v1 + unified v2) or unified

. "$(dirname "$0")/private-host.sh"
hold_repository

# cgroup file systems rooted at our cgroup namespace (the caller moved us into
# a fresh cgroup first), so systemd's cgroups land below it, not at the
# host's root.
mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
if [ "$cgroup_layout" = hybrid ]; then
    mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
    mount -t cgroup -o none,name=systemd,xattr cgroup /sys/fs/cgroup/systemd
    mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
else
    umount /sys/fs/cgroup
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi

if [ "$stage" = none ]; then
    # A host without dtprobed-py: install.sh will run here for real, so every
    # place it writes is private (/etc as an overlay whose writes go to WORK_DIR).
    mount -t tmpfs -o mode=0755 tmpfs /usr/local
    mkdir -p "$work/etc-upper" "$work/etc-work"
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$work/etc-upper,workdir=$work/etc-work" /etc
    mount -t tmpfs -o mode=0755 tmpfs /var/log
else
    # The staged install, where the installed host would have it.
    mount --bind "$stage/usr/local" /usr/local
fi

# A private /run (the stash, systemd's state), with the test's files in it.
private_run_and_tmp "$work"

private_dev

restore_repository

# systemd's world: only the stock targets and slices (no .wants, so nothing but
# what the test enables starts) plus the staged units in /usr/local.
units=$(mktemp -d /run/units.XXXXXX)
cp /usr/lib/systemd/system/*.target /usr/lib/systemd/system/*.slice "$units"/
mount --bind "$units" /usr/lib/systemd/system
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
# The daemon's stderr to a file the test reads (there is no journald here).
mkdir -p /etc/systemd/system/dtprobed.service.d
cat >/etc/systemd/system/dtprobed.service.d/test-log.conf <<'EOF'
[Service]
StandardOutput=append:/run/dtprobed-test/daemon.log
StandardError=inherit
EOF

exec env -i container=dtprobed-test PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=basic.target --log-target=console --log-level=info \
    --show-status=no
