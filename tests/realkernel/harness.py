"""Real processes for the shared helper-device scenarios: a private daemon, clients, DOF files.

Used by the in-VM CUSE suite (tests/realkernel/guest/), the host-side FUSE run of the
same scenarios and bench/bench_cuse_vs_fuse.py.  Nothing here is mocked: the daemon is
``python -m dtprobed`` in a given ``--device-mode``, the clients are client.c (compiled
with gcc) and pyclient.py, each registering DOF that lies in an object of its own: a memfd
holding text, then the DOF, as a shared library holds both.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.dof_abi import DOF_HDR, DOF_SEC, DOF_SECT_COMMENTS
from common.dof_build import ProbeSpec, ProviderSpec, build_dof

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CLIENT_SOURCE = HERE / "client.c"
PYCLIENT = HERE / "pyclient.py"
#: The tests' tracepoints start here; each client loads 512 KiB of text and relocates them into it.
TRACEPOINT_BASE = 0x401000
#: Emulated kernels are slow: generous bounds for waits (never asserted as timings).
WAIT_S = float(os.environ.get("DTPROBED_TEST_WAIT", "60"))


# --- DOF -----------------------------------------------------------------------------


def probes_dof(provider: str, nprobes: int = 3) -> bytes:
    """A ``dtrace -G``-like DOF whose tracepoints lie in client.c's text.

    Each probe address carries a SETX relocation, as ``dtrace -G`` emits: the parser
    adds ``dofhp_addr`` to it (the clients' text minus ``TRACEPOINT_BASE``).
    """
    probes = [
        ProbeSpec(
            func=f"fn{i}",
            name=f"probe{i}",
            offsets=[0x10],
            addr=TRACEPOINT_BASE + 0x40 * i,
            native=["int", "char *"],
        )
        for i in range(nprobes)
    ]
    return build_dof([ProviderSpec(provider, probes, relocate=True)]).data


def padded_dof(dof: bytes, size: int, fill: int = 0) -> bytes:
    """*dof* grown to exactly *size* bytes (``loadsz`` too) by a trailing COMMENTS section.

    A section header is appended (every section's data moves down by 32 bytes, which
    keeps their alignment) and the COMMENTS data fills the rest.  COMMENTS is not a
    loadable type and carries no LOAD flag, so the parser skips it: the probes are
    unchanged, only the bytes to fetch grow.  *fill* lets DOF of equal size differ.
    """
    hdr = DOF_HDR.unpack_from(dof)
    sections_end = hdr.secoff + hdr.secnum * hdr.secsize
    if sections_end != hdr.secoff + hdr.secnum * DOF_SEC.size or hdr.loadsz != len(dof):
        raise ValueError("padded_dof wants a DOF as build_dof lays it out")
    headers = bytearray()
    for i in range(hdr.secnum):
        sec = DOF_SEC.unpack_from(dof, hdr.secoff + i * DOF_SEC.size)
        headers += DOF_SEC.pack(
            sec.type, sec.align, sec.flags, sec.entsize, sec.offset + DOF_SEC.size, sec.size
        )
    body = dof[sections_end:]
    comments_offset = sections_end + DOF_SEC.size + len(body)
    filler: int = size - comments_offset
    if filler < 0:
        raise ValueError(f"{len(dof)}-byte DOF cannot be padded to {size}")
    headers += DOF_SEC.pack(DOF_SECT_COMMENTS, 1, 0, 0, comments_offset, filler)
    header: bytes = DOF_HDR.pack(
        hdr.ident,
        hdr.flags,
        hdr.hdrsize,
        hdr.secsize,
        hdr.secnum + 1,
        hdr.secoff,
        size,
        size,
        hdr.pad,
    )
    padding = bytes([fill]) * filler
    out = header + dof[DOF_HDR.size : hdr.secoff] + bytes(headers) + body + padding
    assert len(out) == size
    return out


# --- clients ----------------------------------------------------------------------------


def build_c_client(out_dir: Path) -> Path:
    """Compile client.c (or take ``$DTPROBED_TEST_CLIENT``, built on the host already)."""
    prebuilt = os.environ.get("DTPROBED_TEST_CLIENT")
    if prebuilt:
        return Path(prebuilt)
    binary = out_dir / "dtprobed-test-client"
    subprocess.run(
        ["gcc", "-O1", "-Wall", "-o", str(binary), str(CLIENT_SOURCE)],
        check=True,
    )
    return binary


@dataclass(frozen=True)
class ClientKind:
    """How to start one of the two clients; both speak the same line protocol."""

    name: str  # "c" or "python"
    argv0: tuple[str, ...]

    def argv(self, device: str, dof_file: Path, commands: Sequence[str]) -> list[str]:
        return [*self.argv0, device, str(dof_file), *commands]


def client_kinds(c_binary: Path) -> dict[str, ClientKind]:
    return {
        "c": ClientKind("c", (str(c_binary),)),
        "python": ClientKind("python", (sys.executable, "-S", str(PYCLIENT))),
    }


class ClientProcess:
    """A running client: commands go to its stdin, one answer line comes back for each."""

    def __init__(self, kind: ClientKind, device: str, dof_file: Path) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            kind.argv(device, dof_file, ["pid", "stdin"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._pending = b""
        self.pid = int(self._read().split()[1])

    def _read(self) -> str:
        """The next answer line (our own buffer: select() can't see a reader's buffer)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + WAIT_S
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{self.kind.name} client {self.proc.pid} did not answer")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"{self.kind.name} client exited: {self.proc.wait()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> list[str]:
        self.send(command)
        return self._read().split()

    def receive(self) -> list[str]:
        return self._read().split()

    def open(self) -> None:
        assert self.ask("open") == ["open", "OK"]

    def add(self, mod: str | None = None) -> tuple[int, int]:
        """ADDDOF: (generation, 0) or (-1, errno)."""
        answer = self.ask(f"add {mod}" if mod else "add")
        return int(answer[1]), int(answer[2])

    def remove(self, gen: int) -> tuple[int, int]:
        answer = self.ask(f"remove {gen}")
        return int(answer[1]), int(answer[2])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def finish(self) -> None:
        """Close stdin (the client exits) and reap it."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


def spawn_with_pid(kind: ClientKind, device: str, dof_file: Path, pid: int) -> ClientProcess:
    """Start a client whose pid is *pid*, through ``/proc/sys/kernel/ns_last_pid``.

    Needs root in the pid namespace and nothing else forking at the same moment (true
    in the VM, where this test is the only thing running); retries until WAIT_S.
    """
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with open("/proc/sys/kernel/ns_last_pid", "w") as last:
            last.write(str(pid - 1))
        client = ClientProcess(kind, device, dof_file)
        if client.pid == pid:
            return client
        client.finish()  # someone else forked in between: try again
        time.sleep(0.05)
    raise RuntimeError(f"could not start a client with pid {pid}")


# --- the daemon ---------------------------------------------------------------------


def mountpoints() -> set[str]:
    with open("/proc/self/mountinfo") as info:
        return {line.split()[4] for line in info}


class PrivateDaemon:
    """``python -m dtprobed`` on a private device and state dir, in one device mode."""

    def __init__(
        self, device: str, state_dir: Path, mode: str, log_file: Path, extra: Sequence[str] = ()
    ) -> None:
        self.device = device
        self.state_dir = state_dir
        self.mode = mode
        self.log_file = log_file
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, ready_fd: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dtprobed",
            "-F",
            "--device",
            self.device,
            "--device-mode",
            self.mode,
            "-s",
            str(self.state_dir),
            "--ready-fd",
            str(ready_fd),
            # generous (as tests/support/daemon.py): under emulation on a loaded host a
            # child's first answer took over the default 5 s (the stash writer at start-up);
            # a test that wants another bound passes its own -t, which comes later and wins
            "--timeout",
            "30",
            *self.extra,
        ]

    def start(self) -> None:
        read_end, write_end = os.pipe()
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(write_end), pass_fds=(write_end,), stdout=log, stderr=log, cwd=REPO
            )
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], WAIT_S)
            if not ready or not os.read(read_end, 1):
                status = self.proc.poll()
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                why = f"exited with {status}" if status is not None else f"silent for {WAIT_S} s"
                raise RuntimeError(f"dtprobed did not get ready ({why}):\n{self.log()}")
        finally:
            os.close(read_end)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon and reap it; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.proc = None

    def served_as(self) -> str | None:
        """How the device is served right now: "cuse", "fuse" or None."""
        try:
            st = os.stat(self.device)
        except OSError:
            return None
        if stat.S_ISCHR(st.st_mode):
            return "cuse"
        if self.device in mountpoints():
            return "fuse"
        return None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.served_as() == "fuse":  # a killed daemon leaves its mount behind
            subprocess.run(["umount", "-l", self.device], check=False)


_device_counter = 0


def private_device(mode: str, tmp: Path) -> str:
    """A device path nobody else uses: /dev/dtrace/test-N for CUSE, a temp file for FUSE."""
    global _device_counter
    _device_counter += 1
    if mode == "fuse":
        return str(tmp / f"helper-{_device_counter}")
    return f"/dev/dtrace/test-{os.getpid()}-{_device_counter}"


def wait_until(predicate: object, what: str) -> None:
    """Poll *predicate* (a callable) until it is true; fail after WAIT_S."""
    assert callable(predicate)
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def have_gcc() -> bool:
    return shutil.which("gcc") is not None
