"""Small OS helpers every role of the daemon uses: /proc, fd loops, pidfds, directory fds."""
