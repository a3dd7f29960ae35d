#!/usr/bin/env bash
# Build the Debian package of dtprobed-py from this tree:
#
#   bash packaging/deb/build.sh [--out DIR] [--wheels DIR]
#       -> DIR/dtprobed-py_VERSION_amd64.deb (default dist/)
#
# Needs python3 (>= 3.11) with venv, dpkg-deb (in dpkg) and strip (binutils);
# reaches PyPI only to download the pinned wheels of requirements.txt and the
# build backend (setuptools). The wheels are kept in --wheels DIR (default
# dist/.wheels), so a rebuild downloads them no more. No debhelper: the
# maintainer scripts next to this file are written by hand after
# dh_installsystemd's snippets. What goes where, and why: packaging/deb/README.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
out=$src/dist
wheels=

die() { echo "build.sh: $*" >&2; exit 1; }
say() { echo "build.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; wheels=$2; shift 2 ;;
        --wheels=*) wheels=${1#--wheels=}; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

python=/usr/bin/python3
[ -x "$python" ] || die "no /usr/bin/python3 (apt-get install python3 python3-venv)"
"$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$python must be >= 3.11 with venv (apt-get install python3-venv)"
command -v dpkg-deb >/dev/null || die "no dpkg-deb (apt-get install dpkg)"
command -v strip >/dev/null || die "no strip (apt-get install binutils)"

pkg=dtprobed-py
arch=amd64  # the msgspec wheels of requirements.txt are x86_64
[ "$(uname -m)" = x86_64 ] || die "builds on x86_64 only (the pinned wheels are x86_64)"
upstream_version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
# A native package (its packaging lives in the project): no Debian revision.
version=$upstream_version
changelog_version=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "$here/changelog")
[ "$changelog_version" = "$version" ] \
    || die "packaging/deb/changelog is at $changelog_version, pyproject.toml at $version: add a changelog entry"
# Reproducible: every timestamp is the last changelog entry's.
SOURCE_DATE_EPOCH=$(date -d "$(sed -n 's/^ -- .*>  //p' "$here/changelog" | head -1)" +%s)
export SOURCE_DATE_EPOCH

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
venv_dir=/usr/lib/$pkg/venv
venv=$root$venv_dir
site=$venv/lib/python3/site-packages
mkdir -p "$out"
out=$(cd "$out" && pwd)

# --- Tools and wheels -------------------------------------------------------------
say "a build environment (pip, setuptools) in $work/tools"
"$python" -m venv "$work/tools"
tools=$work/tools/bin/python
pip() { "$tools" -m pip --disable-pip-version-check --no-input "$@"; }

wheels=${wheels:-$out/.wheels}
mkdir -p "$wheels"
say "the pinned wheels (requirements.txt) into $wheels"
# One msgspec wheel per CPython: pip picks a wheel by its tags, so ask for each.
for pyver in 3.11 3.12 3.13 3.14; do
    pip download --quiet --no-deps --require-hashes --only-binary=:all: \
        --implementation cp --python-version "$pyver" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --dest "$wheels" -r "$here/requirements.txt"
done

say "the dtprobed-py wheel"
tree=$work/tree
mkdir -p "$tree"
(cd "$src" && tar --exclude=./.venv --exclude=./.git --exclude='*.egg-info' --exclude=./build \
    --exclude=./dist --exclude=__pycache__ --exclude=./.mypy_cache --exclude=./.ruff_cache \
    --exclude=./.pytest_cache -cf - .) | tar -C "$tree" -xf -
pip wheel --quiet --no-deps --wheel-dir "$work/wheels" "$tree"

# --- The private environment --------------------------------------------------------
# A virtual environment that runs on whatever python3 the system has (>= 3.11):
# bin/python3 is /usr/bin/python3, and lib/python3.X (the directory site.py
# looks in for the running version) is lib/python3 for every X the package
# supports. Made by hand, not by `python3 -m venv`: that would tie it to the
# build machine's minor version.
say "the private environment $venv_dir"
mkdir -p "$venv/bin" "$site"
ln -s ../../../../bin/python3 "$venv/bin/python3"  # /usr/bin/python3
ln -s python3 "$venv/bin/python"
for minor in 11 12 13 14; do
    ln -s python3 "$venv/lib/python3.$minor"
done
cat >"$venv/pyvenv.cfg" <<CFG
home = /usr/bin
include-system-site-packages = false
version = 3
CFG

unpack() { "$tools" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; }
unpack "$work/wheels/dtprobed_py-$upstream_version-py3-none-any.whl" "$site"
unpack "$wheels/pyseccomp-0.1.2-py3-none-any.whl" "$site"
# msgspec: the cp311 wheel whole, then the other versions' extension modules
# beside its own, after checking their Python files are the same.
first=
for whl in "$wheels"/msgspec-0.22.0-cp31[1-4]-*.whl; do
    if [ -z "$first" ]; then
        unpack "$whl" "$site"
        first=$whl
        continue
    fi
    unpack "$whl" "$work/msgspec"
    (cd "$work/msgspec" && find msgspec -type f ! -name '_core.*.so') | while read -r f; do
        cmp -s "$work/msgspec/$f" "$site/$f" || die "$(basename "$whl"): $f differs from $(basename "$first")'s"
    done
    cp "$work/msgspec"/msgspec/_core.*.so "$site/msgspec/"
    rm -rf "$work/msgspec"
done
[ "$(find "$site/msgspec" -name '_core.cpython-31[1-4]-x86_64-linux-gnu.so' | wc -l)" = 4 ] \
    || die "expected 4 msgspec extension modules"
# The record of the files pip would have installed (not of this layout), and
# metadata nothing reads; the licences are in /usr/share/doc/dtprobed-py/copyright.
# METADATA stays: importlib.metadata reads the version from it.
rm -rf "$site"/*.dist-info/RECORD "$site"/*.dist-info/INSTALLER "$site"/*.dist-info/top_level.txt \
    "$site"/*.dist-info/entry_points.txt "$site"/*.dist-info/LICENSE "$site"/*.dist-info/licenses
# As dh_strip does: no debugging symbols, no .comment/.note sections.
find "$site" -name '*.so' -exec strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +
find "$site" -name '*.so' -exec chmod 0644 {} +

# --- Commands --------------------------------------------------------------------------
# As install.sh writes them: the private interpreter, -I (no PYTHONPATH, no
# user site in a root daemon), [project.scripts] of pyproject.toml as the source.
"$python" - "$src/pyproject.toml" <<'PY' | while read -r name module function; do
import sys
import tomllib

for name, target in tomllib.load(open(sys.argv[1], "rb"))["project"]["scripts"].items():
    module, function = target.split(":")
    print(name, module, function)
PY
    case $name in dtprobed) dir=/usr/sbin ;; *) dir=/usr/bin ;; esac
    mkdir -p "$root$dir"
    cat >"$root$dir/$name" <<ENTRY
#!$venv_dir/bin/python3 -I
# $name, installed by the Debian package dtprobed-py.
import sys

from $module import $function

sys.exit($function())
ENTRY
    chmod 0755 "$root$dir/$name"
done

# --- systemd, udev, man pages, documentation ---------------------------------------------
install -d "$root/usr/lib/systemd/system/dtprobed.service.d" "$root/usr/lib/systemd/system-preset" \
    "$root/usr/lib/udev/rules.d" "$root/usr/share/man/man8" "$root/usr/share/man/man1" \
    "$root/usr/share/doc/$pkg" "$root/usr/share/lintian/overrides"
sed "s|@SBINDIR@|/usr/sbin|g; s|packaging/install.sh substitutes @SBINDIR@|the Debian package substituted /usr/sbin|" \
    "$src/packaging/dtprobed.service.in" >"$root/usr/lib/systemd/system/dtprobed.service"
install -m 0644 "$src/packaging/dtrace-usdt.target" "$root/usr/lib/systemd/system/"
install -m 0644 "$here/dtprobed-deb.conf" "$root/usr/lib/systemd/system/dtprobed.service.d/50-debian-package.conf"
install -m 0644 "$src/packaging/50-dtprobed.preset" "$root/usr/lib/systemd/system-preset/"
install -m 0644 "$src/packaging/60-dtprobed.rules" "$root/usr/lib/udev/rules.d/"
gzip -9n <"$src/docs/man/dtprobed.8" >"$root/usr/share/man/man8/dtprobed.8.gz"
gzip -9n <"$src/docs/man/dtprobed-parse.1" >"$root/usr/share/man/man1/dtprobed-parse.1.gz"
gzip -9n <"$src/docs/man/dtprobed-stash.1" >"$root/usr/share/man/man1/dtprobed-stash.1.gz"
doc=$root/usr/share/doc/$pkg
install -m 0644 "$here/copyright" "$doc/copyright"
gzip -9n <"$here/changelog" >"$doc/changelog.gz"
for f in "$src/README.md" "$src"/docs/*.md "$here/README.md"; do
    name=$(basename "$f")
    [ "$f" != "$here/README.md" ] || name=README.Debian.md
    # Debian Policy 12.3: documentation over 4 KiB compressed.
    if [ "$(stat -c %s "$f")" -gt 4096 ]; then
        gzip -9n <"$f" >"$doc/$name.gz"
    else
        install -m 0644 "$f" "$doc/$name"
    fi
done
if [ -s "$here/lintian-overrides" ]; then
    install -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/$pkg"
else
    rmdir "$root/usr/share/lintian/overrides" "$root/usr/share/lintian"
fi

# --- Control files -------------------------------------------------------------------------
control=$root/DEBIAN
mkdir -p "$control"
diversions=$(grep -v '^#' "$here/diversions" | grep . | tr '\n' ' ')
diversions=${diversions% }
for script in preinst postinst prerm postrm; do
    sed "s|@DIVERSIONS@|$diversions|" "$here/$script" >"$control/$script"
    chmod 0755 "$control/$script"
done
install -m 0644 "$here/triggers" "$control/triggers"
find "$root" -path "$control" -prune -o -type f -print0 | sort -z \
    | xargs -0 md5sum | sed "s|  $root/|  |" >"$control/md5sums"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@INSTALLED_SIZE@|$installed_size|" \
    "$here/control.in" >"$control/control"

# --- The .deb -------------------------------------------------------------------------------------
find "$root" -type d -exec chmod 0755 {} +
find "$root" -print0 | xargs -0 -r touch -h -d "@$SOURCE_DATE_EPOCH"
deb=$out/${pkg}_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
say "built $deb ($(du -k "$deb" | cut -f1) KiB)"
echo "$deb"
