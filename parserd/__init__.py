"""The sandboxed DOF parser child (see parserd.child)."""
