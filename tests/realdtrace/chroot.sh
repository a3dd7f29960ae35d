#!/bin/bash
# Build (once per machine) a Debian sid chroot holding Oracle DTrace 2.0.7 as packaged by
# Debian (dtrace, libdtrace2, libdtrace2-dev) plus gcc, make, binutils and strace, so the
# tests can use the real consumer and the real `dtrace -h/-G` as a test partner.
#
#   tests/realdtrace/chroot.sh            build if needed, print the chroot path
#   DTPROBED_DTRACE_CHROOT=DIR chroot.sh  use DIR instead of the default
#
# Idempotent and serialised with flock(1) on DIR.lock. The stamp DIR/.dtprobed-py-ready is
# written last, so a build that was killed is redone: a chroot without the stamp is removed
# (after checking nothing is mounted inside it) and built again from debootstrap.
#
# Quirks of this machine kind applied here (see ../shared/design.md, "The real dtrace 2.0.7
# as a test partner"):
#   - the archive snapshot's Release file has expired: apt in the chroot gets
#     Acquire::Check-Valid-Until "false";
#   - the kernel lacks CONFIG_KALLSYMS_ALL, so the stock io.d fails every D compile: a copy of
#     the chroot's /usr/lib/x86_64-linux-gnu/dtrace without io.d is kept at SYSLIBDIR (path
#     inside the chroot, printed below and stored in the stamp), for -xsyslibdir=.
set -euo pipefail

DIR=${DTPROBED_DTRACE_CHROOT:-/var/cache/dtprobed-py/sid-dtrace}
DIR=${DIR%/}
RECIPE=1  # bump when the package list or the steps change: forces the later steps to rerun
PACKAGES="dtrace libdtrace2 libdtrace2-dev gcc make binutils libc6-dev strace"
SYSLIBDIR=/opt/dtprobed-py/dtrace-syslib  # inside the chroot
STAMP="$DIR/.dtprobed-py-ready"

log() { printf '[chroot.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
case "$DIR" in /*) ;; *) die "DTPROBED_DTRACE_CHROOT must be an absolute path: $DIR" ;; esac
[ "$DIR" != / ] || die "refusing to use / as the chroot"

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
if ! flock -n 9; then
    log "another build holds $DIR.lock; waiting"
    flock 9
fi

if [ -f "$STAMP" ] && grep -qx "recipe=$RECIPE" "$STAMP"; then
    log "ready: $DIR ($(grep '^built=' "$STAMP" | cut -d= -f2-))"
    echo "$DIR"
    exit 0
fi

mounted_below() {  # prints mount points at or below $1 (from /proc/self/mountinfo)
    awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
}

START=$(date +%s)
umask 022

if [ ! -f "$DIR/.dtprobed-py-debootstrap" ]; then
    # Nothing usable from an interrupted run: start over (but never delete through a mount).
    if [ -e "$DIR" ]; then
        m=$(mounted_below "$DIR")
        [ -z "$m" ] || die "mounts below $DIR (a test still running?): $m"
        log "removing incomplete $DIR"
        rm -rf --one-file-system "$DIR"
    fi
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap on the host"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2
    fi
    # The Debian mirror: first URI of a non-security stanza of the host's deb822 sources.
    URI=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$URI" ] || die "no Debian URI in /etc/apt/sources.list.d/debian.sources"
    log "debootstrap --variant=minbase sid $DIR $URI"
    mkdir -p "$DIR"
    debootstrap --variant=minbase sid "$DIR" "$URI" >&2 \
        || die "debootstrap failed (see $DIR/debootstrap/debootstrap.log)"
    echo "uri=$URI" >"$DIR/.dtprobed-py-debootstrap"
    log "debootstrap done ($(($(date +%s) - START)) s)"
fi

# apt in the chroot: the snapshot's Release is past Valid-Until; no recommends; no services.
cat >"$DIR/etc/apt/apt.conf.d/99dtprobed-py" <<'EOF'
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
EOF
printf '#!/bin/sh\nexit 101\n' >"$DIR/usr/sbin/policy-rc.d"
chmod 755 "$DIR/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$DIR/etc/resolv.conf" 2>/dev/null || true

# /proc for the maintainer scripts, unmounted again whatever happens.
mountpoint -q "$DIR/proc" || { mount -t proc proc "$DIR/proc" && trap 'umount "$DIR/proc"' EXIT; }

log "apt-get install $PACKAGES"
# A run killed while dpkg worked leaves packages half-configured: finish them first.
chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C dpkg --configure -a >&2
chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get update -q >&2
chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
    apt-get install -y -q $PACKAGES >&2
chroot "$DIR" apt-get clean

VERSION=$(chroot "$DIR" dpkg-query -W -f '${Version}' dtrace)
log "dtrace package version $VERSION"
case "$VERSION" in 2.0.7*) ;; *) log "warning: expected dtrace 2.0.7, got $VERSION" ;; esac

log "syslibdir without io.d at $SYSLIBDIR"
rm -rf "${DIR:?}$SYSLIBDIR"
mkdir -p "$(dirname "$DIR$SYSLIBDIR")"
cp -a "$DIR/usr/lib/x86_64-linux-gnu/dtrace" "$DIR$SYSLIBDIR"
find "$DIR$SYSLIBDIR" -name io.d -delete

mkdir -p "$DIR/var/cache/dtprobed-py/progs"

SIZE=$(du -sx --block-size=1M "$DIR" | cut -f1)
ELAPSED=$(($(date +%s) - START))
{
    echo "recipe=$RECIPE"
    echo "built=$(date -u +%FT%TZ) in ${ELAPSED}s, ${SIZE} MiB"
    echo "dtrace=$VERSION"
    echo "syslibdir=$SYSLIBDIR"
} >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "ready: $DIR (${ELAPSED} s, ${SIZE} MiB)"
echo "$DIR"
