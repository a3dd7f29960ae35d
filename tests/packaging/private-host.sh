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

# A private /run holding the test's files (WORK_DIR as /run/dtprobed-test) and
# an empty private /tmp.
private_run_and_tmp() {
    mount -t tmpfs -o mode=0755 tmpfs /run
    mkdir -p /run/dtprobed-test
    mount --bind "$1" /run/dtprobed-test
    mount -t tmpfs -o mode=1777 tmpfs /tmp
}

# A private /dev holding only the nodes the daemon (and systemd) need, so the
# daemon's /dev/dtrace/helper is not the host's.
private_dev() {
    local hostdev node
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
}
