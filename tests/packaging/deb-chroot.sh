#!/bin/bash
# A Debian unstable chroot for tests/packaging/test_deb.py: a COPY of the shared
# dtrace 2.0.7 chroot (tests/realdtrace/chroot.sh; never modified here) plus
# systemd, so a private systemd can boot in it and apt can install our .deb.
#
#   tests/packaging/deb-chroot.sh      build if needed (flock), print the path
#   DTPROBED_DEB_CHROOT=DIR ...        another path (default below)
#
# Kept between runs at a fixed path outside the clone; the stamp DIR/.dtprobed-deb-ready
# is written last, and a copy without it is removed and made again. The test
# never writes into it either: it boots an overlay whose upper layer is its own.
set -euo pipefail

DIR=${DTPROBED_DEB_CHROOT:-/var/cache/dtprobed-py/sid-dtrace-deb}
DIR=${DIR%/}
RECIPE=3  # bump when the steps change
PACKAGES="systemd lintian"
STAMP="$DIR/.dtprobed-deb-ready"
here=$(cd "$(dirname "$0")" && pwd)

log() { printf '[deb-chroot.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$DIR" in /?*) ;; *) die "DTPROBED_DEB_CHROOT must be an absolute path: $DIR" ;; esac

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9

# The shared chroot (built if needed), and its stamp: a rebuilt base means a new copy.
BASE=$(bash "$here/../realdtrace/chroot.sh")
BASE_STAMP=$(grep '^built=' "$BASE/.dtprobed-py-ready")
if [ -f "$STAMP" ] && grep -qx "recipe=$RECIPE" "$STAMP" && grep -qxF "base=$BASE_STAMP" "$STAMP"; then
    log "ready: $DIR"
    echo "$DIR"
    exit 0
fi

START=$(date +%s)
if [ -e "$DIR" ]; then
    if awk -v d="$DIR" '$5 == d || index($5, d "/") == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        die "mounts below $DIR (a test still running?)"
    fi
    log "removing the old $DIR"
    rm -rf --one-file-system "$DIR"
fi

# Copy only the base chroot's own file system: other tests may have /proc, /sys, /dev
# and their helper files mounted in it right now (a non-recursive bind sees none).
log "copying $BASE to $DIR"
mkdir -p "$DIR"
unshare --mount --propagation private sh -c '
    mkdir -p "$2.src" && mount --bind "$1" "$2.src" && cp -a "$2.src/." "$2/" && umount "$2.src" && rmdir "$2.src"
' sh "$BASE" "$DIR"
rm -f "$DIR/.dtprobed-py-ready"

# apt and dpkg run here for real, with /proc; no services started while we set up.
unshare --mount --propagation private bash -euc '
    DIR=$1; shift
    mount -t proc proc "$DIR/proc"
    cp /etc/resolv.conf "$DIR/etc/resolv.conf" 2>/dev/null || true
    chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get update -q >&2
    chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get install -y -q "$@" >&2
    chroot "$DIR" apt-get clean
    # What the test installs (our dependencies) and reinstalls (libdtrace2),
    # downloaded now into apt'"'"'s cache: the test needs no network.
    chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        apt-get install -y -q --download-only python3 >&2
    chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        apt-get install -y -q --download-only --reinstall libdtrace2 >&2
' bash "$DIR" $PACKAGES
# The test boots systemd in here: services must start (no policy-rc.d), and the
# machine has an id of its own.
rm -f "$DIR/usr/sbin/policy-rc.d"
chroot "$DIR" systemd-machine-id-setup >/dev/null 2>&1 || true

ELAPSED=$(($(date +%s) - START))
{
    echo "recipe=$RECIPE"
    echo "base=$BASE_STAMP"
    echo "built=$(date -u +%FT%TZ) in ${ELAPSED}s"
    echo "systemd=$(chroot "$DIR" dpkg-query -W -f '${Version}' systemd)"
} >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "ready: $DIR (${ELAPSED} s)"
echo "$DIR"
