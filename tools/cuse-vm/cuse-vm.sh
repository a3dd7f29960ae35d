#!/usr/bin/env bash
# cuse-vm.sh: run one command in a throw-away QEMU (TCG) VM whose kernel has
# CUSE, on the host's own root filesystem (read-only under a RAM overlay) with
# the current directory shared read-write.  The command's stdout and stderr
# come back live; the script exits with the command's exit status, 124 on
# timeout, 125 when the VM itself failed.  See README.md next to this file.
set -u -o pipefail

readonly TOOL_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly GUEST_INIT=$TOOL_DIR/guest-init.sh
# What the guest needs; each module's own dependencies are added from its .ko.
readonly GUEST_MODULES="virtio_pci 9pnet_virtio 9p fuse cuse overlay"

mem=${CUSEVM_MEM:-1024}
timeout_s=${CUSEVM_TIMEOUT:-600}
smp=${CUSEVM_SMP:-1}
cache=${CUSEVM_CACHE:-/tmp/cusevm}
verbose=0 keep=0 share_cwd=1 overlay=1 fresh_tmp=1 bypass_shims=1 refresh=0
extra_shares=()

usage() {
    cat <<EOF
usage: cuse-vm.sh [options] -- COMMAND [ARGS...]
  --mem MB       guest memory (default $mem; below ~96 the guest hangs)
  --timeout S    stop the VM after S seconds, exit 124 (default $timeout_s)
  --smp N        guest CPUs (default $smp)
  --share DIR    also share DIR read-write at the same path (repeatable)
  --no-cwd       do not share the current directory
  --no-overlay   read-only root instead of a RAM overlay over it
  --host-tmp     show the host's /tmp (through the overlay), not an empty tmpfs
  --keep-shims   keep PATH as is (default: the active pyenv version's bin
                 folder goes before the pyenv shims, which cost ~2.5 s a call)
  --keep         keep the job folder (console log, outputs, status)
  --refresh      download the kernel again and rebuild the initramfs
  -v, --verbose  stream the guest console to stderr
Environment: CUSEVM_CACHE (default /tmp/cusevm), CUSEVM_KERNEL_PKG (default:
what linux-image-amd64 depends on), CUSEVM_KERNEL=bzimage (no PVH boot),
CUSEVM_QEMU_ARGS (extra qemu arguments).
Exit status: the command's; 124 timeout; 125 VM failure (job folder kept).
EOF
}

note() { echo "cuse-vm: $*" >&2; }
fail() { note "error: $*"; exit 125; }
debug() { if [ "$verbose" = 1 ]; then note "$*"; fi; }

while [ $# -gt 0 ]; do
    case $1 in
        --mem) mem=${2:?}; shift ;;
        --mem=*) mem=${1#*=} ;;
        --timeout) timeout_s=${2:?}; shift ;;
        --timeout=*) timeout_s=${1#*=} ;;
        --smp) smp=${2:?}; shift ;;
        --smp=*) smp=${1#*=} ;;
        --share) extra_shares+=("${2:?}"); shift ;;
        --share=*) extra_shares+=("${1#*=}") ;;
        --no-cwd) share_cwd=0 ;;
        --no-overlay) overlay=0 ;;
        --host-tmp) fresh_tmp=0 ;;
        --keep-shims) bypass_shims=0 ;;
        --keep) keep=1 ;;
        --refresh) refresh=1 ;;
        -v | --verbose) verbose=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) usage >&2; fail "unknown option '$1' (put the command after --)" ;;
    esac
    shift
done
[ $# -gt 0 ] || { usage >&2; fail "no command given"; }
for n in mem timeout_s smp; do
    [[ ${!n} =~ ^[0-9]+$ ]] || fail "${n%_s} wants a whole number, not '${!n}'"
done
[ -r "$GUEST_INIT" ] || fail "$GUEST_INIT is missing"

# ---------------------------------------------------------------------------
# Host tools: qemu and cpio come from apt when missing.
# ---------------------------------------------------------------------------
ensure_host_tools() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v dpkg-deb >/dev/null || fail "dpkg-deb not found: this tool needs a Debian-like host"
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || fail "please install ${missing[*]} (apt-get install ${missing[*]})"
    note "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "${missing[@]}" >&2; } ||
        fail "apt-get install ${missing[*]} failed"
}

# apt-get download runs as the _apt user when it can: give it the folder.
apt_download() {   # folder package
    chown _apt "$1" 2>/dev/null
    (cd "$1" && apt-get download "$2" >&2) ||
        { apt-get update >&2 && (cd "$1" && apt-get download "$2" >&2); }
}

# ---------------------------------------------------------------------------
# Cache: one folder per kernel package version, holding the kernel, the
# unpacked modules it needs and the initramfs (named after its inputs' hash).
# ---------------------------------------------------------------------------
kernel_package() {
    if [ -n "${CUSEVM_KERNEL_PKG:-}" ]; then echo "$CUSEVM_KERNEL_PKG"; return; fi
    apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

candidate_version() {   # package
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }'
}

unpack_module() {   # source destination
    case $1 in
        *.ko.xz) xz -dc "$1" >"$2" ;;
        *.ko.zst) zstd -qdc "$1" >"$2" ;;
        *.ko.gz) gzip -dc "$1" >"$2" ;;
        *) cp "$1" "$2" ;;
    esac
}

module_depends() {   # the depends= field of a .ko's modinfo
    tr '\0' '\n' <"$1" | grep -a -m1 '^depends=' | cut -d= -f2 | tr ',-' ' _'
}

# Copies the wanted modules and their dependencies into $1/modules and writes
# the load order (dependencies first) to $1/modules.load.  The package ships no
# modules.dep, so the order comes from each module's depends= field.
collect_modules() {   # kernel-folder module-tree
    local out=$1 tree=$2 file name
    declare -A file_of=() builtin=() seen=()
    local order=()
    while IFS= read -r file; do
        name=${file##*/}; name=${name%%.ko*}
        file_of[${name//-/_}]=$file
    done < <(find "$tree" -name '*.ko*')
    if [ -r "$tree/modules.builtin" ]; then
        while IFS= read -r file; do
            name=${file##*/}; name=${name%%.ko*}
            builtin[${name//-/_}]=1
        done <"$tree/modules.builtin"
    fi
    add_module() {
        local mod=$1 dep
        [ -z "${seen[$mod]:-}" ] || return 0
        seen[$mod]=1
        if [ -z "${file_of[$mod]:-}" ]; then
            [ -n "${builtin[$mod]:-}" ] && return 0
            fail "module $mod is neither built in nor shipped"
        fi
        unpack_module "${file_of[$mod]}" "$out/modules/$mod.ko" || fail "cannot unpack $mod"
        for dep in $(module_depends "$out/modules/$mod.ko"); do add_module "$dep"; done
        order+=("$mod")
    }
    mkdir -p "$out/modules"
    for name in $GUEST_MODULES; do add_module "${name//-/_}"; done
    printf '%s\n' "${order[@]}" >"$out/modules.load"
}

# The kernel has CONFIG_PVH=y, so QEMU can boot the uncompressed ELF directly
# and skip the in-guest decompression (half the boot time under TCG).
extract_vmlinux() {   # bzImage output
    local magic tool offset
    for pair in '\xFD7zXZ\x00:xz -dc' '\x28\xB5\x2F\xFD:zstd -qdc' '\x1F\x8B\x08:gzip -dc'; do
        magic=${pair%%:*} tool=${pair#*:}
        command -v "${tool%% *}" >/dev/null || continue
        for offset in $(LC_ALL=C grep -obUaP "$magic" "$1" | cut -d: -f1); do
            tail -c +"$((offset + 1))" "$1" | $tool >"$2.new" 2>/dev/null
            if [ "$(head -c 4 "$2.new" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                mv "$2.new" "$2"
                return 0
            fi
        done
    done
    rm -f "$2.new"
    return 1
}

fetch_kernel() {   # package version folder
    local package=$1 folder=$3 work tree
    note "fetching $package $2 (first use only)"
    work=$(mktemp -d "$cache/fetch.XXXXXX") || fail "mktemp failed"
    apt_download "$work" "$package" || { rm -rf "$work"; fail "apt-get download $package failed"; }
    dpkg-deb -x "$work"/*.deb "$work/root" || { rm -rf "$work"; fail "cannot unpack $package"; }
    rm -rf "$folder.new"
    mkdir -p "$folder.new"
    cp "$work"/root/boot/vmlinuz-* "$folder.new/vmlinuz" || fail "$package has no boot/vmlinuz-*"
    cp "$work"/root/boot/config-* "$folder.new/config" 2>/dev/null
    tree=$(find "$work/root/lib/modules" "$work/root/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n 1)
    [ -n "$tree" ] || fail "$package has no modules folder"
    basename "$tree" >"$folder.new/release"
    collect_modules "$folder.new" "$tree"
    if grep -q '^CONFIG_PVH=y' "$folder.new/config" 2>/dev/null &&
        extract_vmlinux "$folder.new/vmlinuz" "$folder.new/vmlinux"; then
        debug "PVH kernel extracted"
    fi
    rm -rf "$work" "$folder"
    mv "$folder.new" "$folder"
    note "kernel $(cat "$folder/release"); modules: $(tr '\n' ' ' <"$folder/modules.load")"
}

# A static busybox runs /init; the host's if it is static, else the one in the
# busybox-static package (downloaded, not installed: it conflicts with busybox).
fetch_busybox() {
    local candidate work
    for candidate in /bin/busybox /usr/bin/busybox; do
        if [ -x "$candidate" ] && LC_ALL=C ldd "$candidate" 2>&1 | grep -q 'not a dynamic'; then
            cp "$candidate" "$cache/busybox.new" && mv "$cache/busybox.new" "$cache/busybox" && return 0
        fi
    done
    work=$(mktemp -d "$cache/fetch.XXXXXX") || fail "mktemp failed"
    apt_download "$work" busybox-static || { rm -rf "$work"; fail "apt-get download busybox-static failed"; }
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/root" &&
        cp "$work/root/bin/busybox" "$cache/busybox.new" && mv "$cache/busybox.new" "$cache/busybox" ||
        { rm -rf "$work"; fail "busybox-static holds no bin/busybox"; }
    rm -rf "$work"
}

build_initramfs() {   # kernel-folder output
    local root applet
    root=$(mktemp -d "$cache/initramfs.XXXXXX") || fail "mktemp failed"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,job,lower,rw,newroot,lib/modules}
    cp "$cache/busybox" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list-full); do
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
    cp "$1"/modules/*.ko "$root/lib/modules/"
    cp "$1/modules.load" "$root/modules.load"
    install -m 755 "$GUEST_INIT" "$root/init"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$2.new" ||
        { rm -rf "$root"; fail "cpio failed"; }
    mv "$2.new" "$2"
    rm -rf "$root"
}

# Sets KERNEL_IMAGE and INITRAMFS; runs under the cache lock.
prepare_cache() {
    local package version folder digest
    if [ "$refresh" = 1 ] || [ ! -s "$cache/kernel" ] || [ ! -s "$cache/$(cat "$cache/kernel")/vmlinuz" ]; then
        command -v apt-get >/dev/null || fail "apt-get not found"
        package=$(kernel_package)
        [ -n "$package" ] || { apt-get update >&2; package=$(kernel_package); }
        [ -n "$package" ] || fail "no linux-image-*-amd64 package known to apt"
        version=$(candidate_version "$package")
        [ -n "$version" ] && [ "$version" != "(none)" ] || fail "apt has no candidate for $package"
        folder="k-${package}_${version//[:\/]/_}"
        if [ "$refresh" = 1 ] || [ ! -s "$cache/$folder/vmlinuz" ]; then
            fetch_kernel "$package" "$version" "$cache/$folder"
        fi
        echo "$folder" >"$cache/kernel.new" && mv "$cache/kernel.new" "$cache/kernel"
    fi
    folder=$cache/$(cat "$cache/kernel")
    KERNEL_IMAGE=$folder/vmlinuz
    if [ "${CUSEVM_KERNEL:-}" != bzimage ] && [ -s "$folder/vmlinux" ]; then
        KERNEL_IMAGE=$folder/vmlinux
    fi
    if [ "$refresh" = 1 ] || [ ! -s "$cache/busybox" ]; then fetch_busybox; fi
    digest=$(cat "$GUEST_INIT" "$folder/modules.load" "$cache/busybox" | sha256sum | cut -c1-16)
    INITRAMFS=$folder/initramfs-$digest.cpio
    if [ ! -s "$INITRAMFS" ]; then
        rm -f "$folder"/initramfs-*.cpio
        build_initramfs "$folder" "$INITRAMFS"
    fi
}

ensure_host_tools
mkdir -p "$cache/jobs" || fail "cannot create $cache"
exec 9>"$cache/lock" || fail "cannot open $cache/lock"
flock 9 || fail "cannot lock $cache/lock"
prepare_cache
exec 9>&-

# ---------------------------------------------------------------------------
# The job folder: cmd (the guest's script), config, shares, outputs.
# ---------------------------------------------------------------------------
quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

job=$(mktemp -d "$cache/jobs/job.XXXXXX") || fail "cannot create a job folder"
job=$(cd "$job" && pwd -P)
cwd=$(pwd -P)

# pyenv shims are bash scripts that fork a lot, slow under TCG: put the bin
# folders of the version pyenv picks here before them.
guest_path() {
    local root prefixes prefix bins="" entry result=""
    [ "$bypass_shims" = 1 ] && [[ ":$PATH:" == *"/shims:"* ]] && command -v pyenv >/dev/null || return 1
    root=$(pyenv root 2>/dev/null) && prefixes=$(pyenv prefix 2>/dev/null) || return 1
    IFS=: read -r -a prefixes <<<"$prefixes"
    for prefix in "${prefixes[@]}"; do
        [[ $prefix == "$root"/versions/* ]] && [ -d "$prefix/bin" ] && bins+=$prefix/bin:
    done
    [ -n "$bins" ] || return 1
    IFS=: read -r -a entries <<<"$PATH"
    for entry in "${entries[@]}"; do
        [ "$entry" = "$root/shims" ] && result+=$bins && bins=""
        result+=$entry:
    done
    echo "${result%:}"
}

{
    echo "# written by cuse-vm.sh; runs under /bin/sh in the guest's chroot"
    while IFS= read -r name; do
        case $name in
            PWD | OLDPWD | SHLVL | _ | SHELLOPTS | BASHOPTS | BASH_* | PPID | UID | EUID | HOSTNAME) continue ;;
        esac
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && printf 'export %s=%s\n' "$name" "$(quote "${!name}")"
    done < <(compgen -e)
    if path=$(guest_path); then printf 'export PATH=%s\n' "$(quote "$path")"; fi
    printf 'export CUSEVM_GUEST=1 CUSEVM_JOB=%s\n' "$(quote "$job")"
    echo '[ -z "${TMPDIR:-}" ] || mkdir -p -- "$TMPDIR" 2>/dev/null'
    printf 'cd -- %s || exit 125\n' "$(quote "$cwd")"
    printf 'exec'
    for arg in "$@"; do printf ' %s' "$(quote "$arg")"; done
    echo
} >"$job/cmd"
printf 'JOB_PATH=%s\nOVERLAY=%s\nFRESH_TMP=%s\n' "$(quote "$job")" "$overlay" "$fresh_tmp" >"$job/config"

# Read-write shares at their host paths: the job folder, the current
# directory, every --share.  Listed shortest first so that nested shares are
# mounted over their parents.
share_list=("$job")
[ "$share_cwd" = 1 ] && share_list+=("$cwd")
for dir in ${extra_shares[@]+"${extra_shares[@]}"}; do
    [ -d "$dir" ] || fail "--share $dir: not a folder"
    share_list+=("$(cd -- "$dir" && pwd -P)")
done
declare -A shared=()
share_lines=()
n=0
for dir in "${share_list[@]}"; do
    [ -z "${shared[$dir]:-}" ] || continue
    shared[$dir]=1
    case $dir in
        / | /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) debug "not sharing system path $dir"; continue ;;
        *$'\n'* | *,*) fail "cannot share '$dir' (commas and newlines break qemu's option syntax)" ;;
    esac
    if [ "$dir" = "$job" ]; then tag=job; else tag=share$n; n=$((n + 1)); fi
    share_lines+=("${#dir} $tag $dir")
done
printf '%s\n' "${share_lines[@]}" | sort -n -s | cut -d' ' -f2- >"$job/shares"
qemu_shares=()
while read -r tag dir; do
    qemu_shares+=(-fsdev "local,id=fs_$tag,path=$dir,security_model=none,multidevs=remap"
        -device "virtio-9p-pci,fsdev=fs_$tag,mount_tag=$tag")
done <"$job/shares"
: >"$job/stdout"
: >"$job/stderr"
: >"$job/console.log"

# ---------------------------------------------------------------------------
# Run QEMU under timeout(1); stream the outputs while it runs.
# ---------------------------------------------------------------------------
qemu=(qemu-system-x86_64 -accel tcg -machine pc -cpu max -smp "$smp" -m "$mem"
    -nodefaults -no-user-config -display none -vga none -no-reboot
    -chardev "file,id=console,path=$job/console.log" -serial chardev:console -monitor none
    -kernel "$KERNEL_IMAGE" -initrd "$INITRAMFS"
    -append "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off random.trust_cpu=on nokaslr rdinit=/init"
    -fsdev "local,id=fs_root,path=/,security_model=none,readonly=on,multidevs=remap"
    -device "virtio-9p-pci,fsdev=fs_root,mount_tag=hostroot"
    "${qemu_shares[@]}" -pidfile "$job/qemu.pid")
# qboot (in qemu-system-data) starts a -kernel much faster than SeaBIOS.
bios=${CUSEVM_BIOS-/usr/share/qemu/qboot.rom}
if [ -n "$bios" ] && [ -r "$bios" ]; then qemu+=(-bios "$bios"); fi
# shellcheck disable=SC2206 # split on blanks on purpose
if [ -n "${CUSEVM_QEMU_ARGS:-}" ]; then qemu+=(${CUSEVM_QEMU_ARGS}); fi
printf '%q ' "${qemu[@]}" >"$job/qemu.cmdline"

timeout_pid="" followers=()
stop_vm() {   # only the processes this script started
    local pid
    for pid in $timeout_pid $(cat "$job/qemu.pid" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
    for pid in ${followers[@]+"${followers[@]}"}; do kill "$pid" 2>/dev/null; done
}
interrupted() { note "interrupted; stopping the VM"; stop_vm; sleep 0.3; rm -rf "$job"; exit "$1"; }
trap 'interrupted 130' INT
trap 'interrupted 143' TERM
trap 'interrupted 129' HUP

started=$(date +%s.%N)
timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null >"$job/qemu.out" 2>&1 &
timeout_pid=$!
tail -n +1 -s 0.2 --pid="$timeout_pid" -f "$job/stdout" &
followers+=($!)
tail -n +1 -s 0.2 --pid="$timeout_pid" -f "$job/stderr" >&2 &
followers+=($!)
if [ "$verbose" = 1 ]; then
    tail -n +1 -s 0.2 --pid="$timeout_pid" -f "$job/console.log" | sed -u 's/\r$//; s/^/[guest] /' >&2 &
    followers+=($!)
fi
wait "$timeout_pid"
qemu_status=$?
timeout_pid=""
for pid in "${followers[@]}"; do wait "$pid" 2>/dev/null; done
followers=()
debug "VM ran $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }') s"

explain() {
    note "qemu exited with $qemu_status; last console lines:"
    tail -n 25 "$job/console.log" | tr -d '\r' | sed 's/^/  | /' >&2
    if [ -s "$job/qemu.out" ]; then sed 's/^/  qemu: /' "$job/qemu.out" >&2; fi
    if [ -s "$job/guest-error" ]; then note "guest: $(cat "$job/guest-error")"; fi
    note "job folder kept: $job"
}

if [ -s "$job/status" ]; then
    status=$(cat "$job/status")
    [[ $status =~ ^[0-9]+$ ]] || { explain; fail "unreadable status '$status'"; }
    if [ "$keep" = 1 ]; then note "job folder kept: $job"; else rm -rf "$job"; fi
    exit "$status"
fi
if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then
    note "error: timed out after $timeout_s s"
    explain
    exit 124
fi
explain
fail "the VM stopped without the command's status"
