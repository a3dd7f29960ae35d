"""Test-side handles for fake USDT clients (:mod:`tests.support.client`) and their DOF.

What a client registers is an object file (:func:`write_dof`): text, then DOF, in
one file, like an ELF object; every client maps an object's text at
:data:`~tests.support.client.CODE_ADDR`, so DOF whose tracepoints land in it can be
built before the client starts (:func:`code_dof`).  :class:`ClientHandle` runs one client process and talks
JSON lines with it; :class:`Clients` tracks them all and kills leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.dof_build import BuiltDof, ProbeSpec, ProviderSpec, build_dof
from tests.support.client import CODE_ADDR, CODE_SIZE, object_bytes
from tests.support.daemon import REPO

ANSWER_TIMEOUT = 30.0


def code_file(tmp_path: Path) -> Path:
    path = tmp_path / "code.bin"
    if not path.exists():
        path.write_bytes(b"\xcc" * CODE_SIZE)
    return path


def code_probe(func: str, name: str, index: int, *, nargs: int = 0) -> ProbeSpec:
    """A probe whose tracepoints lie in the clients' shared text mapping."""
    return ProbeSpec(
        func=func,
        name=name,
        offsets=[0x10, 0x20],
        addr=CODE_ADDR + 0x100 * (index + 1),
        native=["int", "char *", "long"][:nargs],
    )


def code_dof(
    providers: dict[str, list[tuple[str, str]]] | None = None, *, nargs: int = 0
) -> BuiltDof:
    """DOF with the given ``{provider: [(func, probe), ...]}``, tracepoints in the text."""
    providers = providers or {"testprov": [("main", "go"), ("main", "done")]}
    index = 0
    specs = []
    for prov, probes in providers.items():
        plist = []
        for func, name in probes:
            plist.append(code_probe(func, name, index, nargs=nargs))
            index += 1
        specs.append(ProviderSpec(prov, plist))
    return build_dof(specs)


def write_dof(tmp_path: Path, name: str, data: bytes, *, text: bytes | None = None) -> Path:
    """An object file ``name.dof``: ``CODE_SIZE`` bytes of text (*text*, or ``int3``s),
    then the DOF *data*; the client maps the text at ``CODE_ADDR`` and the DOF after it."""
    path = tmp_path / f"{name}.dof"
    path.write_bytes(object_bytes(data) if text is None else object_bytes(data, text))
    return path


def write_plain_dof(tmp_path: Path, name: str, data: bytes) -> Path:
    """A file holding only the DOF *data*: its tracepoints point into another file."""
    path = tmp_path / f"{name}.plain.dof"
    path.write_bytes(data)
    return path


def dof_bytes(path: Path) -> bytes:
    """The DOF of an object file that :func:`write_dof` wrote."""
    return path.read_bytes()[CODE_SIZE:]


class ClientHandle:
    """One fake client process, answering JSON commands."""

    __test__ = False

    def __init__(
        self,
        device: Path,
        code: Path,
        *,
        register: dict[str, Any] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.argv = [
            python,
            "-m",
            "tests.support.client",
            "--device",
            str(device),
            "--code-file",
            str(code),
        ]
        if register is not None:
            self.argv += ["--register", json.dumps(register)]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        self.hello = self.read()
        assert self.hello.get("ready"), self.hello
        self.pid: int = self.hello["pid"]

    def read(self, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"client {self.proc.pid} did not answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"client {self.proc.pid} exited ({self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, cmd: dict[str, Any], *, answer: bool = True) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self.read() if answer else {}

    def register(self, dof_file: Path, **extra: Any) -> dict[str, Any]:
        return self.send({"op": "register", "dof_file": str(dof_file), **extra})

    def exit(self) -> int:
        with contextlib.suppress(BrokenPipeError):
            self.send({"op": "exit"}, answer=False)
        return self.proc.wait(ANSWER_TIMEOUT)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(ANSWER_TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(ANSWER_TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Clients:
    """Starts clients against one daemon and reaps them all at the end."""

    __test__ = False

    def __init__(self, tmp_path: Path, device: Path) -> None:
        self.tmp_path = tmp_path
        self.device = device
        self.code = code_file(tmp_path)
        self.started: list[ClientHandle] = []

    def start(self, **kwargs: Any) -> ClientHandle:
        client = ClientHandle(self.device, self.code, **kwargs)
        self.started.append(client)
        return client

    def close(self) -> None:
        for client in reversed(self.started):
            client.close()


@pytest.fixture
def clients(tmp_path: Path, daemon: Any) -> Iterator[Clients]:
    """Client factory bound to the test's ``daemon``; every client is killed at the end."""
    group = Clients(tmp_path, daemon.device)
    try:
        yield group
    finally:
        group.close()


def wait_until(what: str, predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def loose_clients(tmp_path: Path) -> Iterator[Clients]:
    """Clients of the default private device path (``tmp_path/helper``), for tests that
    start their daemons themselves (``daemon_factory``); request it *after* the factory."""
    group = Clients(tmp_path, tmp_path / "helper")
    try:
        yield group
    finally:
        group.close()
