#!/bin/bash
# The Debian machines of tests/packaging/test_deb.py, built once and cached
# outside the clone:
#
#   tests/packaging/deb-chroot.sh [sid]    Debian unstable with Debian's dtrace 2.0.7:
#       a COPY of the shared chroot of tests/realdtrace/chroot.sh (never modified
#       here), plus systemd and lintian; /var/cache/dtprobed-py/sid-dtrace-deb
#   tests/packaging/deb-chroot.sh bookworm Debian 12 (debootstrap --variant=minbase),
#       plus systemd; /var/cache/dtprobed-py/bookworm-deb
#
# Prints the path. DTPROBED_DEB_CHROOT=DIR: another path. Serialised with flock
# on DIR.lock; the stamp DIR/.dtprobed-deb-ready is written last, and a tree
# without it (or with another recipe, or made from an older shared chroot) is
# removed and made again. The python3 packages the .deb will pull in (and, in
# sid, libdtrace2 for its reinstall) are downloaded into apt's cache here, so
# the test needs no network. The test never writes into these trees: it boots
# an overlay whose upper layer is its own.
set -euo pipefail

SUITE=${1:-sid}
case $SUITE in
    sid) DEFAULT=/var/cache/dtprobed-py/sid-dtrace-deb; PACKAGES="systemd lintian" ;;
    bookworm) DEFAULT=/var/cache/dtprobed-py/bookworm-deb; PACKAGES="systemd" ;;
    *) echo "deb-chroot.sh: unknown suite $SUITE (sid or bookworm)" >&2; exit 2 ;;
esac
DIR=${DTPROBED_DEB_CHROOT:-$DEFAULT}
DIR=${DIR%/}
RECIPE=4  # bump when the steps change
STAMP="$DIR/.dtprobed-deb-ready"
here=$(cd "$(dirname "$0")" && pwd)

log() { printf '[deb-chroot.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$DIR" in /?*) ;; *) die "DTPROBED_DEB_CHROOT must be an absolute path: $DIR" ;; esac

# DIR.lock: the tests hold it shared while they boot overlays of DIR (their
# mounts are in namespaces of their own, invisible here), so a rebuild, which
# takes it exclusive, waits for them; checking the stamp only needs it shared.
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"

if [ "$SUITE" = sid ]; then
    # The shared chroot (built if needed), and its stamp: a rebuilt base means a new copy.
    BASE=$(bash "$here/../realdtrace/chroot.sh")
    BASE_STAMP="base=$(grep '^built=' "$BASE/.dtprobed-py-ready")"
else
    BASE_STAMP="base=debootstrap $SUITE"
fi
ready() { [ -f "$STAMP" ] && grep -qx "recipe=$RECIPE" "$STAMP" && grep -qxF "$BASE_STAMP" "$STAMP"; }
flock -s 9
if ready; then
    log "ready: $DIR"
    echo "$DIR"
    exit 0
fi
flock -u 9
if ! flock -n 9; then
    log "waiting for the users of $DIR (and other builds) to finish"
    flock 9
fi
if ready; then
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
mkdir -p "$DIR"

if [ "$SUITE" = sid ]; then
    # Copy only the base chroot's own file system: other tests may have /proc, /sys,
    # /dev and their helper files mounted in it right now (a non-recursive bind sees none).
    log "copying $BASE to $DIR"
    unshare --mount --propagation private sh -c '
        mkdir -p "$2.src" && mount --bind "$1" "$2.src" && cp -a "$2.src/." "$2/" && umount "$2.src" && rmdir "$2.src"
    ' sh "$BASE" "$DIR"
    rm -f "$DIR/.dtprobed-py-ready"
else
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap on the host"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2
    fi
    URI=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$URI" ] || die "no Debian URI in /etc/apt/sources.list.d/debian.sources"
    log "debootstrap --variant=minbase $SUITE $DIR $URI"
    debootstrap --variant=minbase "$SUITE" "$DIR" "$URI" >&2 \
        || die "debootstrap failed (see $DIR/debootstrap/debootstrap.log)"
    printf 'Acquire::Check-Valid-Until "false";\nAPT::Install-Recommends "false";\n' \
        >"$DIR/etc/apt/apt.conf.d/99dtprobed-py"
fi

# apt and dpkg run here for real, with /proc.
unshare --mount --propagation private bash -euc '
    DIR=$1; shift
    mount -t proc proc "$DIR/proc"
    cp /etc/resolv.conf "$DIR/etc/resolv.conf" 2>/dev/null || true
    run_in() { chroot "$DIR" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@" >&2; }
    run_in apt-get update -q
    run_in apt-get install -y -q "$@"
    run_in apt-get clean
    # What the test installs (our dependencies) and reinstalls (libdtrace2),
    # downloaded now into apt'"'"'s cache.
    run_in apt-get install -y -q --download-only python3
    if chroot "$DIR" dpkg-query -W libdtrace2 >/dev/null 2>&1; then
        run_in apt-get install -y -q --download-only --reinstall libdtrace2
    fi
' bash "$DIR" $PACKAGES
# The test boots systemd in here: services must start (no policy-rc.d), and the
# machine has an id of its own.
rm -f "$DIR/usr/sbin/policy-rc.d"
chroot "$DIR" systemd-machine-id-setup >/dev/null 2>&1 || true

ELAPSED=$(($(date +%s) - START))
{
    echo "recipe=$RECIPE"
    echo "$BASE_STAMP"
    echo "built=$(date -u +%FT%TZ) in ${ELAPSED}s"
    echo "systemd=$(chroot "$DIR" dpkg-query -W -f '${Version}' systemd)"
} >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "ready: $DIR (${ELAPSED} s)"
echo "$DIR"
