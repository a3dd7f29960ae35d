"""Pure parsing of /proc files and the tracepoint rule, on made-up text (no process)."""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import pytest

from common.errors import RequestRejected
from dtprobed.daemon.identity import AddressSpace, fuse_devices_in, glibc_makedev, parse_maps
from dtprobed.oslib.procfs import parse_start_time


def test_glibc_makedev_matches_reference() -> None:
    assert glibc_makedev(0xFD, 0x00) == 64768  # reference §4.1: fd:00
    assert glibc_makedev(0x103, 0x1234) == ((0x103 << 8) | 0x34 | (0x1200 << 12))
    assert glibc_makedev(0x1000, 0) == 0x1000 << 32


def test_start_time_after_the_last_paren() -> None:
    # comm may hold spaces and ')': fields are counted after the last ')'
    stat = ("42 (a) b) (c d) " + " ".join(str(k) for k in range(3, 53))).encode()
    assert parse_start_time(stat) == 22


def test_maps_line_shapes() -> None:
    text = (
        b"7f00-8f00 r-xp 00001000 fd:01 123   /usr/lib/libx.so\n"
        b"9000-a000 rw-p 00000000 00:00 0 \n"
        b"a000-b000 r-xp 00000000 00:2f 77  /tmp/with space (deleted)\n"
        b"c000-d000 rw-p 00000000 00:00 0   [heap]\n"
    )
    lib, anon, deleted, heap = parse_maps(text)
    assert (lib.start, lib.end, lib.dev, lib.ino, lib.path) == (
        0x7F00,
        0x8F00,
        glibc_makedev(0xFD, 1),
        123,
        "/usr/lib/libx.so",
    )
    assert lib.executable and lib.file_backed
    assert not anon.file_backed and anon.path == ""
    assert deleted.file_backed and deleted.path == "/tmp/with space (deleted)"
    assert not heap.file_backed
    space = AddressSpace([heap, deleted, anon, lib])
    own = (glibc_makedev(0, 0x2F), 77)
    space.check_tracepoints([0xA000, 0xA010, 0xAFFF], object_key=own)  # deleted file is fine
    for addr, why in [
        (0x9000, "not executable"),
        (0x8F00, "not mapped"),
        (0xC100, "not executable"),
        (0x7F00, "not of the registering object"),
    ]:
        with pytest.raises(RequestRejected) as info:
            space.check_tracepoints([0xA000, addr], object_key=own)
        assert info.value.errno == errno.EINVAL and why in info.value.reason
        assert f"{addr:#x}" in info.value.reason
    # Anonymous DOF: " (deleted)" in the text proves nothing; without a process whose
    # map_files can be read, nothing passes (tests/integration/test_identity.py has those).
    with pytest.raises(RequestRejected) as info:
        space.check_tracepoints([0xA000], object_key=None)
    assert "not checkable" in info.value.reason


def test_lazy_index_agrees_with_a_full_parse() -> None:
    text = Path(f"/proc/{os.getpid()}/maps").read_bytes()
    full = parse_maps(text)
    space = AddressSpace.from_maps(text)
    for m in full:
        assert space.find(m.start) == m
        assert space.find(m.end - 1) == m
    assert space.mappings == full
    gaps = [a.end for a, b in itertools.pairwise(full) if a.end < b.start]
    assert gaps and all(space.find(addr) is None for addr in gaps)


@pytest.mark.parametrize(
    "text",
    [
        b"2000-3000 r-xp 0 fd:01 1 /a\n1000-1800 r-xp 0 fd:01 1 /b\n",  # unsorted
        b"3000-2000 r-xp 0 fd:01 1 /a\n",  # empty range
        b"zz-3000 r-xp 0 fd:01 1 /a\n",
        b"garbage\n",
    ],
)
def test_malformed_maps_are_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        AddressSpace.from_maps(text)


def test_notes_tracepoints_must_lie_in_the_registering_object() -> None:
    text = (
        b"1000-2000 r--p 00000000 fd:01 10 /opt/app/libprobes.so\n"
        b"2000-3000 r-xp 00001000 fd:01 10 /opt/app/libprobes.so\n"
        b"7000-8000 r-xp 00001000 fd:01 99 /usr/lib/libc.so.6\n"
    )
    space = AddressSpace(parse_maps(text))
    own = (glibc_makedev(0xFD, 1), 10)
    assert space.first_of(*own).start == 0x1000
    space.check_tracepoints([0x2000, 0x2FFF], object_key=own)
    for addr, why in [
        (0x7000, "not of the registering object"),  # libc's text: another inode
        (0x1800, "not executable"),
        (0x5000, "not mapped"),
    ]:
        with pytest.raises(RequestRejected) as info:
            space.check_tracepoints([0x2000, addr], object_key=own)
        assert why in info.value.reason


MOUNTINFO = b"""\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
40 22 0:45 / /home/u/remote rw,nosuid,nodev,relatime shared:20 - fuse.sshfs u@h:/ rw,user_id=1000
41 22 0:46 / /dev/dtrace/helper rw,nosuid,nodev,relatime shared:21 master:3 - fuse dtprobed rw
42 22 8:17 / /mnt/usb rw,relatime - fuseblk /dev/sdb1 rw,user_id=0
43 22 0:47 / /mnt/a\\040-\\040fuse\\040x rw,relatime - tmpfs fuse rw
44 22 0:48 / /mnt/fusectl rw,relatime - fusectl fusectl rw
45 22 0:49 / /srv/fuse.data rw - fuse2 x rw
46 22 300:70000 / /odd rw - fuse.x y rw
"""


def test_fuse_devices_are_read_from_the_fstype_not_the_names() -> None:
    # sshfs, our own helper file and an NTFS fuseblk; not a tmpfs whose mount point and
    # source say "fuse", not fusectl (the control file system), not a "fuse2" type
    assert fuse_devices_in(MOUNTINFO) == {
        glibc_makedev(0, 45),
        glibc_makedev(0, 46),
        glibc_makedev(8, 17),
        glibc_makedev(300, 70000),
    }
    assert fuse_devices_in(b"") == frozenset()
