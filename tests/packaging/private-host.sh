# Sourced by fresh-host.sh and nested-systemd.sh: the pieces of a private
# "host" both build inside their own mount namespace.
# shellcheck shell=bash

# The repository (and the venv in it) is where the tests run from; CI may have
# cloned it below a directory these scripts hide (e.g. /tmp). Keep a handle on
# it now; restore_repository binds it back at the same path afterwards.
hold_repository() {
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    exec 9<"$repo"
}

restore_repository() {
    if [ ! -e "$repo/pyproject.toml" ]; then
        mkdir -p "$repo"
        # --no-canonicalize: resolving the fd link would name the hidden path
        mount --no-canonicalize --bind "/proc/$$/fd/9" "$repo"
    fi
    exec 9<&-
}

# The host's own dtprobed may be installed and serving: its FUSE mount on
# /dev/dtrace/helper (and its tmpfs on /run/dtrace) were copied into this
# namespace by unshare. Covering /dev or /run hides them but leaves them in
# /proc/self/mountinfo, where install.sh, uninstall.sh and the tests look, so
# detach every copy at or below these paths first. They are this namespace's
# copies (propagation private; umount -i: no umount.fuse helper): the host's
# mounts and its daemon are not touched.
detach_inherited() {
    local path points point
    for path in "$@"; do
        # deepest first; mountinfo escapes blanks as \040, none in these paths
        points=$(awk -v p="$path" '$5 == p || index($5, p "/") == 1 { print length($5), $5 }' \
            /proc/self/mountinfo | sort -rn | cut -d' ' -f2-)
        for point in $points; do
            umount -i -l "$point"
        done
    done
}

# Fail unless nothing is mounted at or below the given paths.
assert_clean() {
    local path
    for path in "$@"; do
        if awk -v p="$path" '$5 == p || index($5, p "/") == 1 { found = 1 } END { exit !found }' \
            /proc/self/mountinfo; then
            echo "private-host: $path still has mounts of the host:" >&2
            grep -F " $path" /proc/self/mountinfo >&2
            exit 1
        fi
    done
}

# A private /run holding the test's files (WORK_DIR as /run/dtprobed-test) and
# an empty private /tmp. /run is a tmpfs (as under systemd), or with "disk" a
# directory of WORK_DIR, on whatever file system that is (ext4 on this
# project's machine kind, where /run is not a tmpfs).
private_run_and_tmp() {
    detach_inherited /run/dtrace
    if [ "${2:-tmpfs}" = disk ]; then
        mkdir -p "$1/run-disk"
        mount --bind "$1/run-disk" /run
    else
        mount -t tmpfs -o mode=0755 tmpfs /run
    fi
    mkdir -p /run/dtprobed-test
    mount --bind "$1" /run/dtprobed-test
    mount -t tmpfs -o mode=1777 tmpfs /tmp
}

# A private /dev holding only the nodes the daemon (and systemd) need, so the
# daemon's /dev/dtrace/helper is not the host's.
private_dev() {
    local hostdev node
    detach_inherited /dev/dtrace
    hostdev=$(mktemp -d /run/hostdev.XXXXXX)
    mount --bind /dev "$hostdev"
    mount -t tmpfs -o mode=0755 tmpfs /dev
    for node in null zero full random urandom tty fuse; do
        touch "/dev/$node"
        mount --bind "$hostdev/$node" "/dev/$node"
    done
    mkdir /dev/shm /dev/pts
    ln -s /proc/self/fd /dev/fd
    ln -s /proc/self/fd/0 /dev/stdin
    ln -s /proc/self/fd/1 /dev/stdout
    ln -s /proc/self/fd/2 /dev/stderr
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    umount -l "$hostdev"
    rmdir "$hostdev"
    assert_clean /dev/dtrace /run/dtrace
}
