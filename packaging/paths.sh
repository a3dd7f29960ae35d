# shellcheck shell=bash
# Where dtprobed-py's files go: the one definition shared by install.sh and
# uninstall.sh (and checked against docs/operations.md by tests/packaging).
# Input: $prefix (default /usr/local) and $root (staging root, default empty).
# Output: the variables below, all *without* $root (the paths as seen on the
# running system); callers prepend $root when they write.

dtprobed_paths() {
    local prefix=$1
    venv_dir=$prefix/lib/dtprobed
    sbin_dir=$prefix/sbin
    bin_dir=$prefix/bin
    man_dir=$prefix/share/man
    doc_dir=$prefix/share/doc/dtprobed-py
    if [ "$prefix" = /usr ]; then
        # A distribution-style install: the vendor directories.
        unit_dir=/usr/lib/systemd/system
        preset_dir=/usr/lib/systemd/system-preset
        udev_rules_dir=/usr/lib/udev/rules.d
    else
        # systemd searches /usr/local/lib/systemd/{system,system-preset} but no
        # other prefix, so units go there whatever the prefix. Local udev rules
        # go to /etc/udev/rules.d: older udev doesn't search /usr/local.
        unit_dir=/usr/local/lib/systemd/system
        preset_dir=/usr/local/lib/systemd/system-preset
        udev_rules_dir=/etc/udev/rules.d
    fi
    # Used only when systemd is not pid 1 (containers): see install.sh.
    pid_file=/run/dtprobed.pid
    log_file=/var/log/dtprobed.log
    state_dir=/run/dtrace
    helper_path=/dev/dtrace/helper
    # The source name of the tmpfs install.sh mounts on $state_dir when that
    # is not in memory already: how uninstall.sh knows the mount is ours.
    state_tmpfs_source=dtprobed
}

# statfs(2) f_type, as stat -f -c %t prints it: tmpfs, ramfs.
dtprobed_in_memory() {  # path
    case $(stat -f -c %t "$1" 2>/dev/null) in
        1021994|858458f6) return 0 ;;
    esac
    return 1
}

# True when the topmost mount on $state_dir is the tmpfs install.sh mounted.
dtprobed_state_tmpfs_is_ours() {
    awk -v p="$state_dir" -v src="$state_tmpfs_source" '
        $5 == p { for (i = 7; $i != "-"; i++) ; top = ($(i + 1) == "tmpfs" && $(i + 2) == src) }
        END { exit !top }' /proc/self/mountinfo
}

# The files install.sh creates, one per line (without $root), for uninstall.sh
# and the tests. The venv directory is listed as a whole.
dtprobed_installed_files() {
    cat <<EOF
$venv_dir
$sbin_dir/dtprobed
$bin_dir/dtprobed-parse
$bin_dir/dtprobed-stash
$unit_dir/dtprobed.service
$unit_dir/dtrace-usdt.target
$preset_dir/50-dtprobed.preset
$udev_rules_dir/60-dtprobed.rules
$man_dir/man8/dtprobed.8
$man_dir/man1/dtprobed-parse.1
$man_dir/man1/dtprobed-stash.1
$doc_dir
EOF
}
