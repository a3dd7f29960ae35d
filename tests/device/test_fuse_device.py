"""FUSE-file mode against the real kernel: a real mount, real client processes, real ioctls."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, many_probes_dof
from common.ioctl import DTRACEHIOC_HASUSDT, DTRACEHIOC_HASUSDT_32
from dtprobed.device.errors import DeviceBusy, DeviceError
from dtprobed.device.fetch import FetchPool
from dtprobed.device.fusefile import FuseFileDevice
from dtprobed.device.opener import open_device
from dtprobed.device.request import HelperRequest, Reply, check_dof_header, helper_dof_address

REPO = Path(__file__).resolve().parents[2]
SMALL_DOF = build_dof([ProviderSpec("prov", [ProbeSpec("f", "p", [1])])]).data

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@dataclass
class Recorder:
    """A handler that records requests and answers *result* (or holds the reply)."""

    result: int = 7
    hold: bool = False
    requests: list[HelperRequest] = field(default_factory=list)
    held: list[Reply] = field(default_factory=list)
    called: threading.Event = field(default_factory=threading.Event)

    max_dof_size: int = 1 << 20
    pool: FetchPool = field(default_factory=FetchPool)

    def __call__(self, req: HelperRequest, reply: Reply) -> None:
        """Fetch a remote DOF as the receiver does (off the device loop: this runs on
        the device thread only because the tests' clients are benign)."""
        assert not req.remote or (req.kind == "adddof" and req.dof == b"")
        if req.remote:
            try:
                data = self.pool.fetch(
                    req.tid,
                    req.uid,
                    helper_dof_address(req.helper),
                    max_size=self.max_dof_size,
                    stream_limit=self.max_dof_size,
                )
                check_dof_header(data[:64], self.max_dof_size)
            except OSError as err:  # RequestRejected is not an OSError: see below
                raise AssertionError(err) from err
            except Exception:
                reply(-errno.EINVAL)
                self.called.set()
                return
            req = dataclasses.replace(req, dof=data)
        self.requests.append(req)
        if self.hold:
            self.held.append(reply)
        else:
            reply(self.result)
        self.called.set()


@dataclass
class Served:
    dev: FuseFileDevice
    path: Path
    recorder: Recorder


@contextmanager
def _serve(path: Path, recorder: Recorder, max_dof_size: int = 1 << 20) -> Iterator[Served]:
    dev = open_device("fuse", str(path), recorder, max_dof_size=max_dof_size)
    assert isinstance(dev, FuseFileDevice)
    stop = threading.Event()
    thread = threading.Thread(target=dev.run, args=(stop,), kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Served(dev, path, recorder)
    finally:
        for reply in recorder.held:  # never leave a client blocked in the kernel
            reply(-errno.EINTR)
        stop.set()
        thread.join(5)
        dev.close()
        recorder.pool.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with _serve(tmp_path / "helper", Recorder()) as served:
        yield served


def run_client(
    helper: Path, *args: str, dof: bytes | None = None, tmp: Path
) -> list[dict[str, int]]:
    cmd = [sys.executable, "-m", "tests.device.client", str(helper), *args]
    if dof is not None:
        (tmp / "dof.bin").write_bytes(dof)
        cmd += ["--dof", str(tmp / "dof.bin")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()][1:]


def test_mount_is_a_0666_file_and_close_removes_placeholder(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "helper"
    with _serve(path, Recorder()):
        st = os.stat(path)
        assert (st.st_mode, st.st_size, st.st_ino) == (0o100666, 0, 1)
        assert os.stat(path).st_dev != os.stat(path.parent).st_dev
    assert not path.exists() and not path.parent.exists()


def test_close_keeps_a_preexisting_file(tmp_path: Path) -> None:
    path = tmp_path / "helper"
    path.write_bytes(b"")
    before = os.stat(path)
    with _serve(path, Recorder()):
        pass
    after = os.stat(path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_adddof_delivers_exact_helper_and_dof(served: Served, tmp_path: Path) -> None:
    out = run_client(served.path, dof=SMALL_DOF, tmp=tmp_path)
    assert out[0]["result"] == 7
    [req] = served.recorder.requests
    assert req.kind == "adddof" and req.tid == out[0]["tid"]
    assert req.dof == SMALL_DOF and len(req.helper) == 80
    assert req.helper[:6] == b"client"


def test_after_the_first_open_a_registration_is_one_request(
    served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSYS to OPEN and FLUSH: the kernel stops sending OPEN, FLUSH and RELEASE."""
    caplog.set_level(logging.DEBUG, logger="dtprobed.device")
    for _ in range(5):  # opens and closes of the device, as every drti client does
        os.close(os.open(served.path, os.O_RDWR | os.O_CLOEXEC))
    for _ in range(3):
        assert run_client(served.path, dof=SMALL_DOF, tmp=tmp_path)[0]["result"] == 7
    assert len(served.recorder.requests) == 3
    names = [r.getMessage().split()[0] for r in caplog.records if " unique=" in r.getMessage()]
    assert names.count("FUSE_OPEN") == 1, names  # answered ENOSYS: the kernel remembers
    assert names.count("FUSE_FLUSH") <= 1, names
    assert names.count("FUSE_RELEASE") == 0, names
    assert names.count("FUSE_IOCTL") == 3, names
    # one request at a time: the one fetch helper, back in the pool after each
    assert len(served.recorder.pool._all) == 1


def test_dof_larger_than_64k(served: Served, tmp_path: Path) -> None:
    big = many_probes_dof(2000).data
    assert len(big) > 200 * 1024
    served.recorder.result = 123
    assert run_client(served.path, dof=big, tmp=tmp_path)[0]["result"] == 123
    assert served.recorder.requests[0].dof == big


def test_loadsz_above_limit_is_einval_without_handler(tmp_path: Path) -> None:
    recorder = Recorder(max_dof_size=len(SMALL_DOF) - 1)
    with _serve(tmp_path / "helper", recorder, max_dof_size=len(SMALL_DOF) - 1) as served:
        out = run_client(served.path, dof=SMALL_DOF, tmp=tmp_path)
        assert out[0]["errno"] == errno.EINVAL
        assert served.recorder.requests == []


def test_unmapped_dof_is_einval_without_handler(served: Served, tmp_path: Path) -> None:
    out = run_client(served.path, "--dof-address", "0x10", tmp=tmp_path)
    assert out[0]["errno"] == errno.EINVAL
    assert served.recorder.requests == []


def test_remove_faults_in_the_kernel_and_never_arrives(served: Served, tmp_path: Path) -> None:
    """REMOVE passes the generation by value; a restricted ioctl copies from that address."""
    out = run_client(served.path, "--remove", "5", tmp=tmp_path)
    assert out[0]["errno"] == errno.EFAULT
    assert served.recorder.requests == []


def run_client_hello(helper: Path, *args: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cmd = [sys.executable, "-m", "tests.device.client", str(helper), *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    hello, *results = [json.loads(line) for line in out.stdout.splitlines()]
    return hello, results


@pytest.mark.parametrize("cmd", [DTRACEHIOC_HASUSDT, DTRACEHIOC_HASUSDT_32])
def test_hasusdt_arrives_with_the_address_in_arg(served: Served, cmd: int) -> None:
    """HASUSDT (dtrace >= 2.0.3) passes a function's address by value.  The restricted
    ioctl copies _IOC_SIZE bytes *from* it (readable code, so it arrives); the address
    is in fuse_ioctl_in.arg and reaches the handler as ``address``."""
    served.recorder.result = 9
    hello, [out] = run_client_hello(served.path, "--hasusdt", "--cmd", hex(cmd))
    assert out["result"] == 9
    [req] = served.recorder.requests
    assert (req.kind, req.tid, req.address, req.gen) == (
        "hasusdt",
        out["tid"],
        hello["address"],
        -1,
    )
    assert req.helper == b"" and req.dof == b""


def test_hasusdt_what_the_kernel_sends(served: Served) -> None:
    """The raw request, as measured: in_size = _IOC_SIZE, the payload the code's bytes."""
    seen: list[tuple[int, int, int, bytes]] = []
    original = served.dev._on_ioctl

    def spy(req: Any) -> None:
        a = req.args
        seen.append((int(a.cmd), int(a.arg), int(a.in_size), bytes(req.payload)))
        original(req)

    served.dev._on_ioctl = spy  # type: ignore[method-assign]
    hello, [out] = run_client_hello(served.path, "--hasusdt")
    assert out["result"] == 7
    assert seen == [(DTRACEHIOC_HASUSDT, hello["address"], 8, bytes.fromhex(hello["code"]))]


def test_hasusdt_of_an_unreadable_address_faults_in_the_kernel(served: Served) -> None:
    _, [out] = run_client_hello(served.path, "--hasusdt", "0x10")
    assert out["errno"] == errno.EFAULT
    assert served.recorder.requests == []


def test_handler_error_reaches_client(served: Served, tmp_path: Path) -> None:
    served.recorder.result = -errno.E2BIG
    assert run_client(served.path, dof=SMALL_DOF, tmp=tmp_path)[0]["errno"] == errno.E2BIG


def test_many_threads_of_one_process(served: Served, tmp_path: Path) -> None:
    out = run_client(served.path, "--threads", "8", dof=SMALL_DOF, tmp=tmp_path)
    assert [o["result"] for o in out] == [7] * 8
    tids = {o["tid"] for o in out}
    assert len(tids) == 8
    assert {r.tid for r in served.recorder.requests} == tids


def test_client_killed_mid_request(served: Served, tmp_path: Path) -> None:
    served.recorder.hold = True
    (tmp_path / "dof.bin").write_bytes(SMALL_DOF)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.device.client",
            str(served.path),
            "--dof",
            str(tmp_path / "dof.bin"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert served.recorder.called.wait(10)
        proc.send_signal(signal.SIGKILL)
        # The killed thread waits in the kernel for our answer: give it, late.
        [reply] = served.recorder.held
        served.recorder.held.clear()
        reply(9)
        reply(10)  # a second answer is ignored, not an error
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    served.recorder.hold = False
    assert run_client(served.path, dof=SMALL_DOF, tmp=tmp_path)[0]["result"] == 7


def test_second_daemon_on_a_live_path_is_refused(served: Served) -> None:
    with pytest.raises(DeviceBusy):
        open_device("fuse", str(served.path), Recorder(), max_dof_size=4096)
    assert os.stat(served.path).st_ino == 1  # the live mount is untouched


def _start_server(path: Path, *prefix: str, host_ns_pid: int = 1) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-m",
            "tests.device.server",
            str(path),
            "--host-ns-pid",
            str(host_ns_pid),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert json.loads(line)["ready"], line
    return proc


def test_stale_mount_of_a_killed_daemon_is_detached_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "helper"
    proc = _start_server(path)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(OSError) as info:
            os.statvfs(path)
        assert info.value.errno == errno.ENOTCONN
        with _serve(path, Recorder()):
            assert run_client(path, dof=SMALL_DOF, tmp=tmp_path)[0]["result"] == 7
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    assert not os.path.ismount(path)


def test_mount_from_a_slave_namespace_reaches_the_host(tmp_path: Path) -> None:
    """A daemon in its own (slave) mount namespace, as under systemd's namespacing
    options, mounts through a setns helper into our namespace: a client here works."""
    path = tmp_path / "helper"
    proc = _start_server(path, "unshare", "-m", "--propagation", "slave", host_ns_pid=os.getpid())
    try:
        assert os.readlink(f"/proc/{proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        out = run_client(path, dof=SMALL_DOF, tmp=tmp_path)
        assert out[0]["result"] == 7
        assert proc.stdout is not None
        seen = json.loads(proc.stdout.readline())
        assert (seen["tid"], seen["kind"], seen["dof_len"], seen["remote"]) == (
            out[0]["tid"],
            "adddof",
            0,  # FUSE mode: the DOF is fetched by the handler, off the device loop
            True,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not path.exists()  # unmounted in our namespace, placeholder removed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_auto_mode_falls_back_to_fuse(tmp_path: Path) -> None:
    """No CUSE on this kernel (and a path outside /dev): auto means FUSE."""
    dev = open_device("auto", str(tmp_path / "helper"), Recorder(), max_dof_size=4096)
    try:
        assert dev.mode == "fuse"
    finally:
        dev.close()
    assert not (tmp_path / "helper").exists()


def test_cuse_mode_refuses_a_path_outside_dev(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="under /dev"):
        open_device("cuse", str(tmp_path / "helper"), Recorder(), max_dof_size=4096)
