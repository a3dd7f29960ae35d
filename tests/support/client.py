"""A fake USDT client: a real process that registers DOF through the helper device.

Run as ``python -m tests.support.client --device PATH --code-file F``.  It
behaves like a program linked with ``dtrace -G`` as far as the daemon can
tell: the DOF lies in a file-backed mapping of the process (a file mapped
``PROT_READ``, like an ELF object's data), and its tracepoints point into an
executable file-backed mapping (a file mapped ``PROT_READ|PROT_EXEC``, like
the object's text) whose address the client reports at start-up.

Protocol: one JSON object per line.  At start-up the client prints
``{"ready": true, "pid": N, "code_addr": A, "code_size": S}``; then it reads
commands on stdin and answers each with one line:

* ``{"op": "register", "dof_file": P, "mod": M, "anon": false, "helper_file": H}`` —
  map the DOF (file-backed, or copied into anonymous memory with ``anon``),
  ``ioctl(DTRACEHIOC_ADDDOF)`` with a mutable 80-byte ``dof_helper_t``
  (``dofhp_addr = 0``, or the DOF's own address with ``anon`` like libusdt);
  answers ``{"gen": G}`` or ``{"errno": E}``, plus ``"dof_addr"``.
* ``{"op": "remove", "gen": G}`` — ``ioctl(DTRACEHIOC_REMOVE, G)`` by value.
* ``{"op": "fork_register", ...register args...}`` — fork; the child registers
  and stays alive until the parent exits (or ``{"op": "end_children"}``); the
  answer carries ``child_pid``.
* ``{"op": "swarm", "count": N, ...register args...}`` — fork N children that
  register at once and stay alive until ``end_children``; answers
  ``{"children": [{"pid": P, "gen": G}, ...]}``.
* ``{"op": "threads", "count": N, ...register args...}`` — N threads register
  the same DOF at once; answers ``{"results": [...]}``.
* ``{"op": "exec", "argv": [...]}`` — ``execv`` (no answer; the new image answers).
* ``{"op": "exit"}``.

Every answer is flushed at once.  The client never touches the stash.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import json
import mmap
import os
import sys
import threading
from typing import Any

from common.dof_build import build_helper
from common.ioctl import DTRACEHIOC_ADDDOF, DTRACEHIOC_REMOVE

CODE_SIZE = 1 << 16
#: Where the client maps its "text": fixed, so tests can build DOF before starting it.
CODE_ADDR = 0x2_0000_0000
MAP_FIXED_NOREPLACE = 0x100000
#: The same file mapped again read-only (file-backed, not executable): a place
#: tracepoints must not point at.
DATA_ADDR = 0x3_0000_0000
#: Anonymous DOF goes below CODE_ADDR, so dofpr_addr > dofhp_addr (= the DOF's own
#: address, as libusdt passes it) and the parser's relocation leaves it alone.
ANON_ADDR = 0x1_0000_0000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
MAP_FAILED = ctypes.c_void_p(-1).value


def map_file(path: str, size: int, prot: int, at: int | None = None) -> int:
    """mmap *path* privately with *prot* (at *at* if given); the address, mapped for life."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    flags = mmap.MAP_PRIVATE | (MAP_FIXED_NOREPLACE if at is not None else 0)
    try:
        addr = _libc.mmap(at, size, prot, flags, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return int(addr)


_anon_next = ANON_ADDR


def map_anonymous(data: bytes) -> int:
    global _anon_next
    size = (max(len(data), 1) + 0xFFF) & ~0xFFF
    addr = _libc.mmap(
        _anon_next,
        size,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
        -1,
        0,
    )
    _anon_next += size + 0x10000  # a gap: never merged with the previous one
    if addr in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    ctypes.memmove(addr, data, len(data))
    return int(addr)


class Client:
    def __init__(self, device: str, code_file: str) -> None:
        self.device = device
        # The "text" file is shared by every client (like one ELF executable); each
        # maps it at CODE_ADDR, so tracepoint addresses are known in advance.
        self.code_addr = map_file(code_file, CODE_SIZE, mmap.PROT_READ | mmap.PROT_EXEC, CODE_ADDR)
        self.data_addr = map_file(code_file, CODE_SIZE, mmap.PROT_READ, DATA_ADDR)
        self.children: list[tuple[int, int]] = []  # (pid, write end keeping it alive)

    def _dof_address(self, cmd: dict[str, Any]) -> int:
        path = cmd["dof_file"]
        if cmd.get("anon"):
            with open(path, "rb") as f:
                return map_anonymous(f.read())
        return map_file(path, os.path.getsize(path), mmap.PROT_READ)

    def _helper(self, cmd: dict[str, Any], dof_addr: int) -> bytearray:
        if "helper_file" in cmd:
            with open(cmd["helper_file"], "rb") as f:
                raw = bytearray(f.read())
            raw[72:80] = dof_addr.to_bytes(8, "little")
            if cmd.get("anon"):
                raw[64:72] = dof_addr.to_bytes(8, "little")  # libusdt: dofhp_addr = dofhp_dof
            return raw
        base = dof_addr if cmd.get("anon") else 0
        return bytearray(build_helper(cmd.get("mod", "fakeclient"), addr=base, dof=dof_addr))

    def register(self, cmd: dict[str, Any], dof_addr: int | None = None) -> dict[str, Any]:
        if dof_addr is None:
            dof_addr = self._dof_address(cmd)
        helper = self._helper(cmd, dof_addr)
        try:
            fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            return {"errno": err.errno, "stage": "open", "dof_addr": dof_addr}
        try:
            gen = fcntl.ioctl(fd, DTRACEHIOC_ADDDOF, helper, True)
        except OSError as err:
            return {"errno": err.errno, "dof_addr": dof_addr}
        finally:
            os.close(fd)
        return {"gen": gen, "dof_addr": dof_addr}

    def remove(self, gen: int) -> dict[str, Any]:
        fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        try:
            result = fcntl.ioctl(fd, DTRACEHIOC_REMOVE, gen)
        except OSError as err:
            return {"errno": err.errno}
        finally:
            os.close(fd)
        return {"result": result}

    def fork_register(self, cmd: dict[str, Any]) -> dict[str, Any]:
        dof_addr = self._dof_address(cmd)  # mapped before the fork: inherited, like an ELF
        report_r, report_w = os.pipe()
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            os.close(alive_w)
            try:
                result = self.register(cmd, dof_addr)
                os.write(report_w, json.dumps(result).encode())
                os.close(report_w)
                os.read(alive_r, 1)  # until the parent exits or ends us
            finally:
                os._exit(0)
        os.close(report_w)
        os.close(alive_r)
        data = b""
        while chunk := os.read(report_r, 4096):
            data += chunk
        os.close(report_r)
        self.children.append((pid, alive_w))
        result = json.loads(data) if data else {"errno": errno.EIO}
        result["child_pid"] = pid
        return result

    def swarm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Fork ``count`` children that all register at once; each stays until ended."""
        dof_addr = self._dof_address(cmd)
        count = int(cmd["count"])
        report_r, report_w = os.pipe()
        alive_r, alive_w = os.pipe()
        pids = []
        for _ in range(count):
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(report_r)
                    os.close(alive_w)
                    result = self.register(cmd, dof_addr)
                    result["pid"] = os.getpid()
                    os.write(report_w, (json.dumps(result) + "\n").encode())  # < PIPE_BUF: atomic
                    os.read(alive_r, 1)
                finally:
                    os._exit(0)
            pids.append(pid)
        os.close(report_w)
        os.close(alive_r)
        data = b""
        while data.count(b"\n") < count and (chunk := os.read(report_r, 1 << 16)):
            data += chunk
        os.close(report_r)
        for pid in pids[:-1]:
            self.children.append((pid, -1))
        self.children.append((pids[-1], alive_w))  # one pipe keeps them all alive
        return {"children": [json.loads(line) for line in data.splitlines()]}

    def end_children(self) -> dict[str, Any]:
        for _pid, alive_w in self.children:
            if alive_w >= 0:
                os.close(alive_w)
        for pid, _alive_w in self.children:
            os.waitpid(pid, 0)
        self.children.clear()
        return {"ended": True}

    def threads(self, cmd: dict[str, Any]) -> dict[str, Any]:
        dof_addr = self._dof_address(cmd)
        count = int(cmd["count"])
        results: list[dict[str, Any]] = [{} for _ in range(count)]
        barrier = threading.Barrier(count)

        def one(i: int) -> None:
            barrier.wait()
            results[i] = self.register(cmd, dof_addr)

        workers = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return {"results": results, "tids_distinct": True}


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", required=True)
    ap.add_argument("--code-file", required=True, help="CODE_SIZE bytes to map executable")
    ap.add_argument("--register", help="JSON register command to run before 'ready'")
    args = ap.parse_args()
    client = Client(args.device, args.code_file)
    hello: dict[str, Any] = {
        "ready": True,
        "pid": os.getpid(),
        "code_addr": client.code_addr,
        "code_size": CODE_SIZE,
    }
    if args.register:
        hello["register"] = client.register(json.loads(args.register))
    _answer(hello)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "register":
            _answer(client.register(cmd))
        elif op == "remove":
            _answer(client.remove(int(cmd["gen"])))
        elif op == "fork_register":
            _answer(client.fork_register(cmd))
        elif op == "swarm":
            _answer(client.swarm(cmd))
        elif op == "end_children":
            _answer(client.end_children())
        elif op == "threads":
            _answer(client.threads(cmd))
        elif op == "exec":
            sys.stdout.flush()
            os.execv(cmd["argv"][0], cmd["argv"])
        elif op == "exit":
            break
        else:
            _answer({"error": f"unknown op {op}"})
    client.end_children()


if __name__ == "__main__":
    main()
