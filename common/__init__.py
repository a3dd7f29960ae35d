"""Definitions shared by the receiver, the parser child and the stash writer.

Nothing in this package does I/O: it holds binary layouts, constants, record
types, framing and the name policy, so every process (and the tests, the fuzz
harness and the benchmarks) uses one definition of each.
"""
