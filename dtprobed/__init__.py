"""dtprobed: the receiver and supervisor, and the stash writer."""
