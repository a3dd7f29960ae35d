"""``dtprobed-parse DOF [--helper DH] [--json]``, ``dtprobed-parse --elf OBJECT [--base N]``.

Runs the sandboxed parser on a DOF file, or on an ELF object's ``.note.usdt``
(what a program built by dtrace ≥ 2.0.3 registers with DTRACEHIOC_HASUSDT).

A user's tool for looking inside DOF, and the parser's command-line test
driver.  It starts the same sandboxed child the daemon uses (through
:class:`dtprobed.children.parser.ParserChild`, so every record is checked
against the schema and grammar) and prints the records of the answer:

* ``--json``: one compact JSON object per line, keys in the order of
  dtprobed-parse(1) (``{"type":"provider","name":S,"nprobes":N}`` …
  ``{"type":"eof"}``), strings as UTF-8;
* otherwise one readable line per record.

With ``--elf`` the object goes through the same two exchanges as a HASUSDT
registration: the child locates ``.note.usdt`` and ``.rodata`` (reading the
file only through the bounded reads this tool answers), then parses those
two sections.  ``--base`` is the load base (``dofhp_addr``) of an ET_DYN
object, 0 by default (link-time addresses); the module is the file's basename.
Tracepoints of a notes object carry their argument string (``"args"`` in JSON).

Exit status: 0 the DOF was accepted (its records, then one ``eof`` line);
1 the parser rejected it (exactly one ``err`` line); 2 usage error; 3 the
parser child died, timed out or was killed by its sandbox (message on stderr).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from typing import Any, Final

import msgspec

from common.argtypes import positive_int, positive_seconds
from common.dof_abi import DOF_HELPER
from common.errors import ChildFailed, RequestRejected
from common.limits import ParseLimits
from common.names import printable
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
    Probe,
    Provider,
    ResultRecord,
    Tracepoint,
)
from dtprobed.children.parser import ParserChild, parse_object_notes, size_error

EXIT_ACCEPTED: Final = 0
EXIT_REJECTED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CHILD_FAILED: Final = 3
DEFAULT_TIMEOUT: Final = 5.0


def record_json(rec: ResultRecord) -> dict[str, Any]:
    """The JSON shape of *rec* in dtprobed-parse(1) (dict order is the key order)."""
    match rec:
        case Provider():
            return {"type": "provider", "name": rec.name, "nprobes": rec.nprobes}
        case Probe():
            return {
                "type": "probe",
                "mod": rec.mod,
                "fun": rec.fun,
                "prb": rec.prb,
                "ntp": rec.ntp,
                "nargc": rec.nargc,
                "xargc": rec.xargc,
            }
        case ArgsNative():
            return {"type": "args_native", "args": list(rec.args)}
        case ArgsXlat():
            return {"type": "args_xlat", "args": list(rec.args)}
        case ArgsMap():
            return {"type": "args_map", "map": list(rec.map)}
        case Tracepoint():
            shape: dict[str, Any] = {
                "type": "tracepoint",
                "addr": rec.addr,
                "is_enabled": rec.is_enabled,
            }
            if rec.args is not None:  # a notes object's source-argument string
                shape["args"] = rec.args
            return shape
        case Err():
            return {"type": "err", "errno": rec.errno, "message": rec.message}
        case Eof():
            return {"type": "eof"}
    raise TypeError(f"not a result record: {rec!r}")


def record_text(rec: ResultRecord) -> str:
    """One readable line; names escaped, since they came from untrusted DOF."""
    match rec:
        case Provider():
            return f"provider {printable(rec.name)} nprobes={rec.nprobes}"
        case Probe():
            spec = ":".join(printable(s) for s in (rec.mod, rec.fun, rec.prb))
            return f"  probe {spec} ntp={rec.ntp} nargc={rec.nargc} xargc={rec.xargc}"
        case ArgsNative():
            return "    args_native (" + ", ".join(printable(a) for a in rec.args) + ")"
        case ArgsXlat():
            return "    args_xlat (" + ", ".join(printable(a) for a in rec.args) + ")"
        case ArgsMap():
            return "    args_map [" + ", ".join(str(i) for i in rec.map) + "]"
        case Tracepoint():
            line = f"    tracepoint {rec.addr:#x}" + (" is-enabled" if rec.is_enabled else "")
            return line if rec.args is None else f"{line} args {printable(rec.args)!r}"
        case Err():
            name = errno.errorcode.get(rec.errno, str(rec.errno))
            return f"err {name} ({rec.errno}): {printable(rec.message)}"
        case Eof():
            return "eof"
    raise TypeError(f"not a result record: {rec!r}")


def _parser() -> argparse.ArgumentParser:
    defaults = ParseLimits()
    p = argparse.ArgumentParser(
        prog="dtprobed-parse",
        description="Run the sandboxed DOF parser on a file and print its records.",
        epilog="Exit status: 0 accepted, 1 rejected, 2 usage error, 3 the parser child failed.",
    )
    p.add_argument(
        "dof",
        metavar="DOF",
        help="file holding the DOF (dofh_loadsz bytes), or with --elf the object",
    )
    p.add_argument(
        "--helper",
        metavar="DH",
        help="file holding the 80-byte dof_helper_t (default: module a.out, addr 0, dof 0)",
    )
    p.add_argument(
        "--elf", action="store_true", help="DOF is an ELF object: parse its .note.usdt section"
    )
    p.add_argument(
        "--base",
        type=_address,
        default=0,
        metavar="N",
        help="with --elf: load base of an ET_DYN object (default 0: link-time addresses)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per record and line")
    p.add_argument(
        "-t",
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        help="seconds the parser child may take (default %(default)s)",
    )
    p.add_argument(
        "--no-sandbox", action="store_true", help="run the parser without its seccomp filter"
    )
    p.add_argument("-d", "--debug", action="store_true", help="show the child's log lines")
    for name in ("max_dof_size", "max_providers", "max_probes", "max_tracepoints"):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=positive_int,
            default=getattr(defaults, name),
            metavar="N",
            help="default %(default)s",
        )
    return p


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an address, not {text}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"address {text} is outside 0 .. 2**64-1")
    return value


def _elf_records(child: ParserChild, path: str, base: int) -> list[ResultRecord]:
    """Locate, read and parse an object's notes exactly as a HASUSDT registration does."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        try:
            found = parse_object_notes(
                child, lambda _: child, os.path.basename(path), base, size, read
            )
        except RequestRejected as err:
            return [Err(errno=err.errno, message=err.reason)]
    return found.result.records


def _read_file(parser: argparse.ArgumentParser, path: str, limit: int) -> tuple[bytes, int]:
    """At most *limit* bytes, and the file's whole size (never read past the limit)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
            size = len(data) if len(data) <= limit else os.fstat(f.fileno()).st_size
    except OSError as err:
        parser.error(f"cannot read {path}: {err.strerror}")
    return data[:limit], size


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        limits = msgspec.convert(
            {
                name: getattr(args, name)
                for name in ("max_dof_size", "max_providers", "max_probes", "max_tracepoints")
            },
            ParseLimits,
        )
    except msgspec.ValidationError as err:
        parser.error(str(err))
    if args.elf and args.helper is not None:
        parser.error("--helper goes with a DOF file, not with --elf")
    if args.base and not args.elf:
        parser.error("--base goes with --elf")
    if args.elf:
        dof, dof_size = b"", 0
        try:
            with open(args.dof, "rb"):
                pass
        except OSError as err:
            parser.error(f"cannot read {args.dof}: {err.strerror}")
    else:
        dof, dof_size = _read_file(parser, args.dof, limits.max_dof_size)
    if args.helper is None:
        helper = DOF_HELPER.pack(b"a.out", 0, 0)
    else:
        helper, helper_size = _read_file(parser, args.helper, DOF_HELPER.size)
        if helper_size != DOF_HELPER.size:
            parser.error(f"{args.helper}: a dof_helper_t is {DOF_HELPER.size} bytes")
    # The child's own log lines (Log records) show with -d; failures are reported once, below.
    logging.basicConfig(format="dtprobed-parse: %(message)s")
    log = logging.getLogger("dtprobed-parse")
    log.setLevel(logging.DEBUG if args.debug else logging.CRITICAL)
    too_big = size_error(dof_size, limits)
    if too_big is not None:
        records: list[ResultRecord] = [too_big]  # the same Err the host sends without asking
    else:
        child = ParserChild(
            limits=limits, timeout=args.timeout, sandbox=not args.no_sandbox, log=log
        )
        try:
            records = (
                _elf_records(child, args.dof, args.base)
                if args.elf
                else child.parse_records(helper, dof)
            )
        except ChildFailed as err:
            print(f"dtprobed-parse: {err}", file=sys.stderr)
            return EXIT_CHILD_FAILED
        finally:
            child.stop()
    verdict = EXIT_REJECTED if isinstance(records[-1], Err) else EXIT_ACCEPTED
    out = sys.stdout.buffer
    try:
        for rec in records:
            if args.json:
                line = json.dumps(record_json(rec), ensure_ascii=False, separators=(",", ":"))
            else:
                line = record_text(rec)
            out.write(line.encode("utf-8") + b"\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly.  SIGPIPE stays ignored in
        # this process because its pipe to the parser child must fail as EPIPE,
        # so point stdout at /dev/null for the interpreter's final flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return verdict


if __name__ == "__main__":
    sys.exit(main())
