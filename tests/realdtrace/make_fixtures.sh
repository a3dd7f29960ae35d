#!/bin/bash
# Rebuild the parser fixtures in tests/parser/fixtures/notes/ with the real dtrace 2.0.7 (the
# chroot of chroot.sh): sources in tests/realdtrace/fixtures_src/, built by its build.sh
# inside the chroot, in a private mount namespace (so nothing is left mounted), at a fixed
# path (/tmp/dtprobed-py-fixtures in the chroot) so rebuilds give the same bytes. Then
# writes NAME.readelf.txt (readelf -h, -S, -n and a hex dump of .note.usdt) beside each.
#   tests/realdtrace/make_fixtures.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(cd "$HERE/../parser/fixtures" && pwd)/notes
ROOT=$("$HERE/chroot.sh")
BUILD=/tmp/dtprobed-py-fixtures  # inside the chroot
FIXTURES="fx_exec libfx.so fx_isenabled fx_kinds fx_kinds.o"

rm -rf "${ROOT:?}$BUILD"
mkdir -p "$ROOT$BUILD"
cp "$HERE"/fixtures_src/* "$ROOT$BUILD/"
# dtrace -h/-G need /proc and the kernel's BTF (/sys/kernel/btf/vmlinux).
unshare --mount --propagation private bash -c '
    set -e
    mount --bind /proc "$1/proc"
    mount --bind /sys "$1/sys"
    chroot "$1" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
        sh -c "cd $2 && sh -x build.sh"
' sh "$ROOT" "$BUILD"

mkdir -p "$OUT"
for f in $FIXTURES; do
    cp "$ROOT$BUILD/$f" "$OUT/$f"
    {
        echo "# readelf output for $f (binutils $(chroot "$ROOT" dpkg-query -W -f '${Version}' binutils), made by tests/realdtrace/make_fixtures.sh)"
        echo "\$ readelf -h $f"
        chroot "$ROOT" readelf -hW "$BUILD/$f"
        echo "\$ readelf -S $f"
        chroot "$ROOT" readelf -SW "$BUILD/$f"
        echo "\$ readelf -n $f"
        chroot "$ROOT" readelf -nW "$BUILD/$f"
        echo "\$ readelf -x .note.usdt $f"
        chroot "$ROOT" readelf -x .note.usdt "$BUILD/$f"
    } | sed "s|$BUILD/||g" >"$OUT/$f.readelf.txt"
done
(cd "$OUT" && sha256sum $FIXTURES >SHA256SUMS)
rm -rf "${ROOT:?}$BUILD"
ls -l "$OUT"
