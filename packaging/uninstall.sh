#!/usr/bin/env bash
# Stop dtprobed-py and remove what packaging/install.sh installed.
#
# Usage: bash packaging/uninstall.sh [--root DIR] [--prefix PREFIX] [--purge] [--stop-only]
#
#   --root DIR, --prefix PREFIX  as given to install.sh.
#   --purge       also remove the DOF stash (/run/dtrace) and /var/log/dtprobed.log.
#                 By default the stash stays: programs that registered probes keep them
#                 visible to dtrace, and a reinstalled (or upstream) dtprobed takes the
#                 stash over, pruning dead processes and reparsing outdated files.
#   --stop-only   only stop the daemon (used by install.sh before a restart).
#
# Idempotent: removing what is already gone is not an error.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=packaging/paths.sh
. "$here/paths.sh"

root=""
prefix=/usr/local
purge=no
stop_only=no

die() { echo "uninstall.sh: $*" >&2; exit 1; }
say() { echo "uninstall.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --purge) purge=yes; shift ;;
        --stop-only) stop_only=yes; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
prefix=${prefix%/}
if [ -n "$root" ]; then
    [ -d "$root" ] || exit 0
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || root=""
fi
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    die "must run as root (or give --root DIR)"
fi
dtprobed_paths "$prefix"

# --- Stop (only on the live system) -------------------------------------------------
stop_pid() {  # pid
    local pid=$1
    say "stopping dtprobed (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        [ -e "/proc/$pid" ] || return 0
        # a zombie (install.sh's child, not yet reaped) has stopped
        [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || return 0
        sleep 0.1
    done
    say "dtprobed (pid $pid) ignored SIGTERM for 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

is_our_daemon() {  # pid: the installed daemon's command line, in our pid namespace
    local pid=$1
    [ -r "/proc/$pid/cmdline" ] || return 1
    [ "$(readlink "/proc/$pid/ns/pid" 2>/dev/null)" = "$(readlink /proc/self/ns/pid)" ] || return 1
    # (awk reads it all: no SIGPIPE for pipefail to turn into a failure)
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null \
        | awk -v d="$sbin_dir/dtprobed" 'NR <= 3 && $0 == d { f = 1 } END { exit !f }'
}

stop_direct() {
    # The daemon install.sh started without systemd: its pid file, checked
    # against /proc so a reused pid is never signalled. A daemon whose pid file
    # is gone (an earlier install from another checkout, a cleaned /run) is
    # found by its command line: the installed dtprobed, in this pid namespace
    # (not one of a container's or a test's private host).
    local pid
    if [ -f "$pid_file" ]; then
        pid=$(cat "$pid_file")
        case $pid in
            ''|*[!0-9]*) ;;
            *) if is_our_daemon "$pid"; then stop_pid "$pid"; fi ;;
        esac
        rm -f "$pid_file"
    fi
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [ "$pid" != $$ ] || continue
        if is_our_daemon "$pid"; then stop_pid "$pid"; fi
    done
}

detach_stale_mount() {
    # A FUSE-mode daemon that died without cleaning up leaves its mount on the
    # helper file (ENOTCONN to every client). Detach it, and remove the empty
    # file FUSE mode creates; a CUSE character device is the kernel's, not ours.
    if awk -v p="$helper_path" '$5 == p { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        say "detaching the stale mount on $helper_path"
        umount -l "$helper_path" || true
    fi
    if [ -f "$helper_path" ] && [ ! -s "$helper_path" ]; then
        rm -f "$helper_path"
        rmdir "$(dirname "$helper_path")" 2>/dev/null || true
    fi
}

if [ -z "$root" ]; then
    if [ -d /run/systemd/system ] && [ "$stop_only" = no ]; then
        systemctl disable --now dtprobed.service 2>/dev/null || true
    elif [ -d /run/systemd/system ]; then
        systemctl stop dtprobed.service 2>/dev/null || true
    fi
    stop_direct
    detach_stale_mount
fi
[ "$stop_only" = no ] || exit 0

# --- Remove files --------------------------------------------------------------------
while read -r path; do
    case $path in /?*) ;; *) die "refusing to remove '$path'" ;; esac
    if [ -e "$root$path" ] || [ -L "$root$path" ]; then
        rm -rf -- "$root$path"
    fi
done <<<"$(dtprobed_installed_files)"
# Directories install.sh may have created and that are now empty.
for dir in "$man_dir/man8" "$man_dir/man1" "$preset_dir" "$udev_rules_dir"; do
    rmdir "$root$dir" 2>/dev/null || true
done

if [ -z "$root" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        if command -v udevadm >/dev/null; then udevadm control --reload || true; fi
    fi
    if [ "$purge" = yes ]; then
        if dtprobed_state_tmpfs_is_ours; then
            # The tmpfs install.sh mounted: the stash goes with it.
            say "unmounting the tmpfs on $state_dir (the stash with it)"
            umount "$state_dir" 2>/dev/null || umount -l "$state_dir"
        fi
        say "removing the stash $state_dir and $log_file"
        if mountpoint -q "$state_dir" 2>/dev/null; then
            # someone else's mount: emptied, left mounted
            find "$state_dir" -mindepth 1 -delete
            rm -f -- "$log_file"
        else
            rm -rf -- "$state_dir" "$log_file"
        fi
    elif dtprobed_state_tmpfs_is_ours; then
        say "kept the stash in $state_dir, on the tmpfs install.sh mounted: it lasts" \
            "until a reboot (remove both with --purge)"
    else
        [ ! -d "$state_dir" ] || say "kept the stash in $state_dir (remove it with --purge)"
    fi
fi
say "dtprobed-py removed"
