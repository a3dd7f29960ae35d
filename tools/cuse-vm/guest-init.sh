#!/bin/sh
# PID 1 of the cuse-vm initramfs (busybox sh).  Packed into the initramfs by
# cuse-vm.sh; never run on the host.
#
# Order of work:
#   modules from /modules.load -> job share (/job) -> host root (9p, read-only)
#   under a tmpfs overlay -> fresh /proc /sys /dev /tmp /run in the new root
#   -> the read-write shares listed in /job/shares -> chroot and run the job
#   script -> record its exit status -> power off.
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
MSIZE=262144

say() { echo "cuse-vm-init: $*" >/dev/console; }
fatal() {
    say "fatal: $*"
    # The host reads this file to explain a VM that stopped without a status.
    echo "$*" >/job/guest-error 2>/dev/null
    sync
    poweroff -f
}
mount9p() {   # tag dir extra-options
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=$MSIZE,$3" "$1" "$2"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

while read -r module; do
    [ -z "$module" ] || insmod "/lib/modules/$module.ko" || say "insmod $module failed"
done </modules.load

mkdir -p /job /lower /rw /newroot
mount9p job /job cache=mmap || fatal "cannot mount the job share"
. /job/config || fatal "cannot read the job configuration"
mount9p hostroot /lower ro,cache=loose || fatal "cannot mount the host root"

# Writes anywhere in the guest succeed but land in guest RAM (tmpfs upper layer).
if [ "$OVERLAY" = 1 ] && mount -t tmpfs -o mode=0755 tmpfs /rw &&
    mkdir -p /rw/upper /rw/work &&
    mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot; then
    :
else
    mount -o bind /lower /newroot || fatal "cannot bind the host root"
fi

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
for link in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2; do
    ln -sf "${link#*:}" "$R/dev/${link%%:*}"
done
[ "$FRESH_TMP" = 1 ] && mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp
mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p $R/run/lock

# One "<tag> <path>" per line, parents before children; a 9p channel can be
# mounted once only, so the job folder is bound from /job.
while read -r tag path; do
    [ -n "$tag" ] || continue
    mkdir -p "$R$path" 2>/dev/null
    if [ "$tag" = job ]; then
        mount -o bind /job "$R$path" || fatal "cannot bind the job folder at $path"
    else
        mount9p "$tag" "$R$path" cache=mmap || fatal "cannot mount $path"
    fi
done </job/shares

hostname cusevm
ifconfig lo 127.0.0.1 up 2>/dev/null

chroot $R /bin/sh "$JOB_PATH/cmd" </dev/null >"$R$JOB_PATH/stdout" 2>"$R$JOB_PATH/stderr"
echo $? >"$R$JOB_PATH/status.new" && mv "$R$JOB_PATH/status.new" "$R$JOB_PATH/status"
sync
poweroff -f
