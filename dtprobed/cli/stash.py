"""``dtprobed-stash [-s STATEDIR] list|show PID|verify [--json]|catch-up``: the DOF stash.

Reads the tree directly and read-only and takes no lock: the state directory
is world-readable, so a lock there is one any user could hold against the
writer (measured: one ``flock(LOCK_SH)`` by any user once stopped the daemon).
The tree may change while it is read: an entry that vanishes meanwhile is
skipped, and ``verify`` reports only the problems that persist over repeated
passes (:func:`verify_settled`).  Exit status: 0 ok, 1 inconsistent
(``verify``), nothing to show or an unreadable stash, 2 usage error.

``catch-up`` is the one command that asks something of the daemon: it finds
the daemon serving STATEDIR by its pid file in root's ``/run/dtprobed``
(:mod:`dtprobed.stash.rundir`; so only root can use it), checks that the pid
still is that daemon (its start time), sends it SIGHUP and waits for the
completion marker of a catch-up that started after the signal, then prints its
summary line.  Exit 1 when no daemon serves STATEDIR or none finished within
``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Final, NoReturn

from common.errors import StashFormatError
from common.records import ArgsMap, ArgsNative, ArgsXlat
from common.stash_format import VERSION, decode_probe_file
from dtprobed.oslib.dirfd import DirFd
from dtprobed.oslib.procfs import start_time_of
from dtprobed.stash import rundir
from dtprobed.stash.layout import (
    MAX_EXEC_MAPPING,
    XATTR_CAUGHT_UP,
    XATTR_START_TIME,
    is_number,
    parse_caught_up,
    read_small,
    split_key,
    split_spec,
)
from dtprobed.stash.verify import verify_settled

EXIT_OK: Final = 0
EXIT_PROBLEM: Final = 1
EXIT_USAGE: Final = 2
DEFAULT_STATE_DIR: Final = "/run/dtrace"
#: How long ``catch-up`` waits for the daemon's run to finish (a scan of a busy host).
CATCH_UP_WAIT: Final = 600.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dtprobed-stash", description="Show or check the DTrace DOF stash.")
    p.add_argument("-s", "--state-dir", default=DEFAULT_STATE_DIR, help="default /run/dtrace")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    lst = sub.add_parser("list", help="one line per registered process")
    lst.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="providers, probes, tracepoints and arguments of PID")
    show.add_argument("pid", type=int)
    show.add_argument("--json", action="store_true")
    ver = sub.add_parser("verify", help="check every invariant of the stash")
    ver.add_argument("--json", action="store_true")
    cup = sub.add_parser(
        "catch-up", help="make the running daemon register the probes of running programs"
    )
    cup.add_argument(
        "--timeout", type=float, default=CATCH_UP_WAIT, help=f"default {CATCH_UP_WAIT:g} s"
    )
    cup.add_argument("--json", action="store_true")
    return p


def _cmd_catch_up(state_dir: str, timeout: float, as_json: bool) -> int:
    try:
        run_dir = rundir.open_run_dir()
    except OSError as err:
        print(f"dtprobed-stash: no daemon to ask ({rundir.RUN_DIR}: {err})", file=sys.stderr)
        return EXIT_PROBLEM
    try:
        raw = rundir.read_small(run_dir, rundir.pid_file_name(state_dir))
        fields = raw.split() if raw is not None else []
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            print(f"dtprobed-stash: no daemon serves {state_dir}", file=sys.stderr)
            return EXIT_PROBLEM
        pid, start = int(fields[0]), int(fields[1])
        if start_time_of(pid) != start:  # a stale pid file: that pid is not our daemon
            print(f"dtprobed-stash: the daemon of {state_dir} (pid {pid}) is gone", file=sys.stderr)
            return EXIT_PROBLEM
        asked = time.monotonic()  # CLOCK_MONOTONIC: the daemon's marker uses the same clock
        os.kill(pid, signal.SIGHUP)
        deadline = asked + timeout
        while True:
            marker = rundir.read_marker(run_dir, state_dir)
            started = marker.get("started") if marker is not None else None
            if marker is not None and isinstance(started, float) and started >= asked:
                break
            if time.monotonic() >= deadline:
                print(f"dtprobed-stash: no catch-up finished within {timeout:g} s", file=sys.stderr)
                return EXIT_PROBLEM
            time.sleep(0.05)
    finally:
        os.close(run_dir)
    print(json.dumps(marker) if as_json else marker.get("summary", ""))
    return EXIT_OK


def _executable(pid: int, pid_fd: int) -> str:
    """/proc/PID/exe if that process is the registered one, else "?"."""
    try:
        stored = os.getxattr(pid_fd, XATTR_START_TIME).decode()
    except OSError:
        stored = None
    if stored is not None and stored.isdigit() and start_time_of(pid) != int(stored):
        return "?"
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"


def _mappings(pid_fd: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name in os.listdir(pid_fd):
        if is_number(name):
            try:
                target = os.readlink(name, dir_fd=pid_fd)
            except OSError:
                continue
            if split_key(target) is not None:
                out.setdefault(target, []).append(int(name))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _probe_json(pf: Any) -> dict[str, Any]:
    native = next((a.args for a in pf.args if isinstance(a, ArgsNative)), [])
    xlat = next((a.args for a in pf.args if isinstance(a, ArgsXlat)), [])
    amap = next((a.map for a in pf.args if isinstance(a, ArgsMap)), [])
    return {
        "provider": pf.provider.name,
        "module": pf.probe.mod,
        "function": pf.probe.fun,
        "name": pf.probe.prb,
        "tracepoints": [{"addr": t.addr, "is_enabled": t.is_enabled} for t in pf.tracepoints],
        "args_native": list(native),
        "args_xlat": list(xlat),
        "args_map": list(amap),
    }


def _describe(pid: int, pid_fd: int) -> dict[str, Any]:
    try:
        em = read_small(pid_fd, "exec-mapping", MAX_EXEC_MAPPING).rstrip(b"\0").decode()
    except (OSError, UnicodeError):
        em = "?"
    try:  # trusted.* xattrs: readable by root only (others see no caught-up generations)
        caught = parse_caught_up(os.getxattr(pid_fd, XATTR_CAUGHT_UP))
    except OSError:
        caught = set()
    mappings = []
    for key, gens in _mappings(pid_fd).items():
        entry: dict[str, Any] = {
            "mapping": key,
            "generations": gens,
            "caught_up": [g for g in gens if g in caught],
            "probes": [],
        }
        try:
            with DirFd(pid_fd, key) as mdir:
                st = os.lstat("raw", dir_fd=mdir.fd)
                entry["raw"] = "shared" if st.st_nlink > 1 else "private"
                with DirFd(mdir.fd, "parsed", readable=True) as parsed:
                    try:
                        v = read_small(parsed.fd, "version", 8)
                        entry["parsed_version"] = VERSION.unpack(v)[0] if len(v) == 8 else None
                    except OSError:
                        entry["parsed_version"] = None
                    for name in sorted(os.listdir(parsed.fd)):
                        if split_spec(name) is None:
                            continue
                        try:
                            pf = decode_probe_file(read_small(parsed.fd, name, 1 << 26))
                        except (OSError, StashFormatError) as err:
                            entry["probes"].append({"file": name, "error": str(err)})
                            continue
                        entry["probes"].append(_probe_json(pf))
        except OSError as err:
            entry["error"] = str(err)
        mappings.append(entry)
    probes = {
        (p["provider"], p["module"], p["function"], p["name"]): p
        for m in mappings
        for p in m["probes"]
        if "error" not in p
    }
    return {
        "pid": pid,
        "executable": _executable(pid, pid_fd),
        "exec_mapping": em,
        "providers": sorted({k[0] for k in probes}),
        "probes": len(probes),
        "tracepoints": sum(len(p["tracepoints"]) for p in probes.values()),
        "mappings": mappings,
    }


def _pids(dofpid_fd: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(dofpid_fd) if is_number(n))


def _cmd_list(root: int, as_json: bool) -> int:
    with DirFd(root, "stash") as stash, DirFd(stash.fd, "dof-pid", readable=True) as dofpid:
        rows = []
        for pid in _pids(dofpid.fd):
            try:
                pdir = DirFd(dofpid.fd, str(pid), readable=True)
            except FileNotFoundError:
                continue  # removed while we read: not a problem
            with pdir:
                d = _describe(pid, pdir.fd)
            del d["mappings"]
            rows.append(d)
    if as_json:
        print(json.dumps({"processes": rows}, ensure_ascii=False))
    else:
        for r in rows:
            print(
                f"{r['pid']}\t{r['executable']}\texec-mapping={r['exec_mapping']}\t"
                f"providers={','.join(r['providers']) or '-'}\tprobes={r['probes']}\t"
                f"tracepoints={r['tracepoints']}"
            )
    return EXIT_OK if rows else EXIT_PROBLEM


def _cmd_show(root: int, pid: int, as_json: bool) -> int:
    try:
        with (
            DirFd(root, "stash") as stash,
            DirFd(stash.fd, "dof-pid") as dofpid,
            DirFd(dofpid.fd, str(pid), readable=True) as pdir,
        ):
            d = _describe(pid, pdir.fd)
    except FileNotFoundError:
        print(f"dtprobed-stash: PID {pid} has nothing in the stash", file=sys.stderr)
        return EXIT_PROBLEM
    if as_json:
        print(json.dumps(d, ensure_ascii=False))
        return EXIT_OK
    print(f"PID {pid}  executable {d['executable']}  exec-mapping {d['exec_mapping']}")
    for m in d["mappings"]:
        print(
            f"  mapping {m['mapping']}  generations {','.join(map(str, m['generations']))}"
            + (f" (caught up: {','.join(map(str, m['caught_up']))})" if m["caught_up"] else "")
            + f"  raw {m.get('raw', '?')}  parsed version {m.get('parsed_version')}"
        )
        for p in m["probes"]:
            if "error" in p:
                print(f"    {p['file']}: {p['error']}")
                continue
            print(f"    {p['provider']}{pid}:{p['module']}:{p['function']}:{p['name']}")
            if p["args_native"]:
                print(f"      args   ({', '.join(p['args_native'])})")
            if p["args_xlat"]:
                print(f"      xlat   ({', '.join(p['args_xlat'])})  map {p['args_map']}")
            for t in p["tracepoints"]:
                kind = "is-enabled" if t["is_enabled"] else "probe"
                print(f"      {kind} {t['addr']:#x}")
    return EXIT_OK


def _cmd_verify(root: int, as_json: bool) -> int:
    problems = verify_settled(root)
    if as_json:
        print(json.dumps({"consistent": not problems, "problems": problems}, ensure_ascii=False))
    elif problems:
        for p in problems:
            print(p)
        print(f"dtprobed-stash: {len(problems)} problem(s) found", file=sys.stderr)
    else:
        print("stash is consistent")
    return EXIT_PROBLEM if problems else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    # A reader that goes away (`| head`) ends us quietly, as any Unix filter.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = _build_parser().parse_args(argv)
    if args.command == "catch-up":
        return _cmd_catch_up(os.path.abspath(args.state_dir), args.timeout, args.json)
    try:
        root = DirFd(None, args.state_dir, readable=True)
    except OSError as err:
        print(f"dtprobed-stash: cannot open {args.state_dir}: {err.strerror}", file=sys.stderr)
        return EXIT_PROBLEM
    with root:
        try:
            if args.command == "list":
                return _cmd_list(root.fd, args.json)
            if args.command == "show":
                return _cmd_show(root.fd, args.pid, args.json)
            return _cmd_verify(root.fd, args.json)
        except OSError as err:
            print(f"dtprobed-stash: cannot read the stash: {err}", file=sys.stderr)
            return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
