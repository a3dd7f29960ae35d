"""``python -m parserd``: the sandboxed parser child (DOF and ELF notes).

    python -m parserd [--no-sandbox] [--max-dof-size N] [--max-providers N]
                      [--max-probes N] [--max-tracepoints N] [--max-object-reads N]
                      [--max-object-bytes N] [--cpu-limit SECONDS]

Started by the daemon (:class:`dtprobed.children.parser.ParserChild`) and by
``dtprobed-parse``, with fd 0 and fd 1 on pipes.  Parses options, builds its
codecs, warms up, locks itself (:mod:`parserd.sandbox`), sends one ``Log``
record saying how it is locked, then serves requests until fd 0 ends.
Failing to lock is fatal: exit status 1 with a message on stderr (the only
time it writes there), before any request is read.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Final, NoReturn

import msgspec

from common.argtypes import positive_int
from common.limits import ParseLimits

#: RLIMIT_CPU soft limit; the host restarts the child long before (see ParserChild).
DEFAULT_CPU_LIMIT: Final = 1200
EXIT_LOCK_FAILED: Final = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ParseLimits()
    parser = argparse.ArgumentParser(prog="python -m parserd", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--no-sandbox", action="store_true", help="do not load the seccomp filter (debugging only)"
    )
    parser.add_argument("--max-dof-size", type=positive_int, default=defaults.max_dof_size)
    parser.add_argument("--max-providers", type=positive_int, default=defaults.max_providers)
    parser.add_argument("--max-probes", type=positive_int, default=defaults.max_probes)
    parser.add_argument("--max-tracepoints", type=positive_int, default=defaults.max_tracepoints)
    parser.add_argument("--max-object-reads", type=positive_int, default=defaults.max_object_reads)
    parser.add_argument("--max-object-bytes", type=positive_int, default=defaults.max_object_bytes)
    parser.add_argument(
        "--cpu-limit",
        type=positive_int,
        default=DEFAULT_CPU_LIMIT,
        metavar="SECONDS",
        help="RLIMIT_CPU of the child over its whole life (default %(default)s)",
    )
    return parser.parse_args(argv)


def limits_from_args(args: argparse.Namespace) -> ParseLimits:
    """The limits, validated against ParseLimits' bounds (a Struct's __init__ does not)."""
    fields = (
        "max_dof_size",
        "max_providers",
        "max_probes",
        "max_tracepoints",
        "max_object_reads",
        "max_object_bytes",
    )
    return msgspec.convert({f: getattr(args, f) for f in fields}, ParseLimits)


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    # Imported here so that `--help` stays cheap; everything is imported before the lock.
    from parserd.child import ChildLoop
    from parserd.sandbox import debug_mode_from_env, lock

    try:
        limits = limits_from_args(args)
        loop = ChildLoop(limits)
        summary = lock(
            warm_up=loop.warm_up,
            # RLIMIT_AS room for the largest request: a DOF, or a ParseNoteBlocks' two blocks
            max_dof_size=max(limits.max_dof_size, limits.max_object_bytes),
            cpu_seconds=args.cpu_limit,
            debug=debug_mode_from_env(),
            seccomp=not args.no_sandbox,
        )
    except Exception as err:  # not locked: stderr is still ours
        print(f"dtprobed-parse: cannot start the parser: {err!r}", file=sys.stderr, flush=True)
        os._exit(EXIT_LOCK_FAILED)
    loop.log(logging.DEBUG, f"parser ready: {summary}")
    loop.serve()


if __name__ == "__main__":
    main()
