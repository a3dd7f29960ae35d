"""A fake USDT client: a real process that registers DOF through the helper device.

Run as ``python -m tests.support.client --device PATH --code-file F``.  It
behaves like a program linked with ``dtrace -G`` as far as the daemon can
tell.  What it registers is an *object file* (:func:`object_bytes`), laid out
like an ELF object: its first ``CODE_SIZE`` bytes are its text, mapped
``PROT_READ|PROT_EXEC`` at ``CODE_ADDR`` (replacing what was there), and its
DOF follows, mapped ``PROT_READ`` from the same file; so the tracepoints lie in
the same file as the DOF, which the daemon requires.  Every object's text is
mapped at the same address, so tracepoint addresses are known before the
client starts.  At start-up ``CODE_ADDR`` holds ``--code-file``, a named file
of the same size (what a DOF aimed at another file's text finds there).

A file that starts with the DOF magic is a *plain DOF file*: mapped read-only
alone, its text left as it is (a DOF whose tracepoints are in another file).

With ``anon`` the DOF is copied into anonymous memory (``dofhp_addr`` =
``dofhp_dof``, like libusdt) and the text is the code file's bytes copied into
an executable private mapping at ``CODE_ADDR`` of, per ``anon_text``:
``memfd`` (the default), ``unlinked`` (a file unlinked after mapping, as
libusdt does), or the refused ones: ``code-file`` (the named code file),
``shared`` (a memfd mapped ``MAP_SHARED``), ``zero`` (``/dev/zero``),
``named-deleted`` (a named file called ``text (deleted)``).

Protocol: one JSON object per line.  At start-up the client prints
``{"ready": true, "pid": N, "code_addr": A, "code_size": S, "libc_text": L}`` (``L``:
the start of libc's executable mapping); then it reads
commands on stdin and answers each with one line:

* ``{"op": "register", "dof_file": P, "mod": M, "anon": false, "helper_file": H}`` —
  map the object (its text too; ``"text": "code-file"`` maps the code file there
  instead) or the plain DOF file, or
  copy the DOF into anonymous memory with ``anon`` (and map text as ``anon_text`` says),
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
MAP_FIXED = 0x10  # not in the mmap module before Python 3.13
MAP_FIXED_NOREPLACE = 0x100000
#: The code file mapped again read-only (file-backed, not executable): a place
#: tracepoints must not point at.
DATA_ADDR = 0x3_0000_0000
#: Anonymous DOF goes below CODE_ADDR, so dofpr_addr > dofhp_addr (= the DOF's own
#: address, as libusdt passes it) and the parser's relocation leaves it alone.
ANON_ADDR = 0x1_0000_0000
DOF_MAGIC = b"\x7fDOF"
ANON_TEXTS = ("memfd", "unlinked", "code-file", "shared", "zero", "named-deleted")

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


def object_bytes(dof: bytes, text: bytes = b"\xcc" * CODE_SIZE) -> bytes:
    """An object file: *text* (``CODE_SIZE`` bytes, mapped at ``CODE_ADDR``), then *dof*."""
    if len(text) != CODE_SIZE:
        raise ValueError(f"text must be {CODE_SIZE} bytes, not {len(text)}")
    return text + dof


def map_fd(fd: int, size: int, prot: int, flags: int, at: int | None, offset: int = 0) -> int:
    """mmap *size* bytes of *fd* from *offset*; the address, mapped for life."""
    addr = _libc.mmap(at, size, prot, flags, fd, offset)
    if addr in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return int(addr)


def map_file(
    path: str,
    size: int,
    prot: int,
    at: int | None = None,
    *,
    offset: int = 0,
    replace: bool = False,
) -> int:
    """mmap *path* privately with *prot* (at *at* if given, over what is there with
    *replace*); the address, mapped for life."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    flags = mmap.MAP_PRIVATE
    if at is not None:
        flags |= MAP_FIXED if replace else MAP_FIXED_NOREPLACE
    try:
        return map_fd(fd, size, prot, flags, at, offset)
    finally:
        os.close(fd)


_anon_next = ANON_ADDR


def map_anonymous(data: bytes) -> int:
    global _anon_next
    size = (max(len(data), 1) + 0xFFF) & ~0xFFF
    addr = map_fd(
        -1,
        size,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
        _anon_next,
    )
    _anon_next += size + 0x10000  # a gap: never merged with the previous one
    ctypes.memmove(addr, data, len(data))
    return addr


def libc_text() -> int:
    """The start of libc's executable mapping in this process (0 if none is found)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and "x" in fields[1] and "/libc.so" in fields[5]:
                return int(fields[0].split("-")[0], 16)
    return 0


class Client:
    def __init__(self, device: str, code_file: str) -> None:
        self.device = device
        self.code_file = code_file
        with open(code_file, "rb") as f:
            self.code = f.read(CODE_SIZE)
        self.code_addr = map_file(code_file, CODE_SIZE, mmap.PROT_READ | mmap.PROT_EXEC, CODE_ADDR)
        self.data_addr = map_file(code_file, CODE_SIZE, mmap.PROT_READ, DATA_ADDR)
        self.children: list[tuple[int, int]] = []  # (pid, write end keeping it alive)

    def _dof_address(self, cmd: dict[str, Any]) -> int:
        """Map what *cmd* registers (the DOF, and the text it points at); the DOF's address."""
        path = cmd["dof_file"]
        if cmd.get("anon"):
            with open(path, "rb") as f:
                data = f.read()
            if data[:4] != DOF_MAGIC:
                data = data[CODE_SIZE:]  # an object file: its DOF
            self._map_anonymous_text(cmd.get("anon_text", "memfd"))
            return map_anonymous(data)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            plain = f.read(4) == DOF_MAGIC
        if plain:
            return map_file(path, size, mmap.PROT_READ)
        text = {"own": path, "code-file": self.code_file}[cmd.get("text", "own")]
        exec_prot = mmap.PROT_READ | mmap.PROT_EXEC
        map_file(text, CODE_SIZE, exec_prot, CODE_ADDR, replace=True)
        return map_file(path, max(size - CODE_SIZE, 1), mmap.PROT_READ, offset=CODE_SIZE)

    def _map_anonymous_text(self, how: str) -> None:
        """Map the code file's bytes at CODE_ADDR from a file that is not the code file."""
        if how not in ANON_TEXTS:
            raise ValueError(f"anon_text {how!r} is not one of {ANON_TEXTS}")
        prot = mmap.PROT_READ | mmap.PROT_EXEC
        flags = MAP_FIXED | (mmap.MAP_SHARED if how == "shared" else mmap.MAP_PRIVATE)
        directory = os.path.dirname(os.path.abspath(self.code_file))
        if how == "zero":
            fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        elif how == "code-file":
            fd = os.open(self.code_file, os.O_RDONLY | os.O_CLOEXEC)
        elif how in ("memfd", "shared"):
            fd = os.memfd_create("usdt-text", os.MFD_CLOEXEC)
        else:
            name = "text (deleted)" if how == "named-deleted" else f"text.{os.getpid()}.tmp"
            fd = os.open(
                os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        try:
            if how not in ("zero", "code-file"):
                os.ftruncate(fd, 0)
                os.write(fd, self.code)
            map_fd(fd, CODE_SIZE, prot, flags, CODE_ADDR)
            if how == "unlinked":
                os.unlink(os.path.join(directory, f"text.{os.getpid()}.tmp"))
        finally:
            os.close(fd)

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
        "libc_text": libc_text(),
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
