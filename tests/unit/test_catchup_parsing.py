"""Catch-up's pure parts: /proc/PID/stat fields, the objects worth locating, the summary."""

from __future__ import annotations

import pytest

from dtprobed.daemon.catchup import PF_KTHREAD, Summary, _stat_fields, objects_of
from dtprobed.daemon.identity import AddressSpace, glibc_makedev


def _stat(comm: bytes, ppid: int, flags: int, start: int) -> bytes:
    # fields 3.. after "(comm)": state ppid pgrp session tty tpgid flags ... field 22 starttime
    rest = [b"S", str(ppid).encode(), b"1", b"1", b"0", b"-1", str(flags).encode()]
    rest += [b"0"] * (21 - 9) + [str(start).encode()] + [b"0"] * 30
    return b"4242 (" + comm + b") " + b" ".join(rest) + b"\n"


def test_stat_fields_count_from_the_last_parenthesis() -> None:
    data = _stat(b"a) S 1 (b", 77, PF_KTHREAD | 0x40, 123456)
    assert _stat_fields(data) == (77, PF_KTHREAD | 0x40, 123456)
    with pytest.raises(ValueError):
        _stat_fields(b"4242 (x) S 1 2")


MAPS = b"""\
00400000-00401000 r--p 00000000 fd:00 100 /usr/bin/prog
00401000-00402000 r-xp 00001000 fd:00 100 /usr/bin/prog
00600000-00601000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 r--p 00000000 fd:00 200 /usr/lib/locale/locale-archive
7f0000200000-7f0000201000 r--p 00000000 fd:00 300 /usr/lib/libx.so
7f0000201000-7f0000202000 r-xp 00001000 fd:00 300 /usr/lib/libx.so
7f0000300000-7f0000301000 r-xp 00000000 00:00 0
7ffc00000000-7ffc00001000 r-xp 00000000 00:00 0 [vdso]
"""


def test_objects_are_files_with_code_by_their_lowest_mapping() -> None:
    objects = objects_of(AddressSpace.from_maps(MAPS))
    dev = glibc_makedev(0xFD, 0)
    assert {key: m.start for key, m in objects.items()} == {
        (dev, 100): 0x400000,  # the load base, not the text mapping
        (dev, 300): 0x7F0000200000,
    }  # no locale archive (never executable), no anonymous code, no vdso


def test_summary_line() -> None:
    s = Summary(processes=5, registered=2)
    s.skipped.update({"another helper": 2, "kernel threads": 1})
    assert s.line() == (
        "catch-up: 5 processes scanned, 2 objects registered, 3 skipped "
        "(2 another helper, 1 kernel threads)"
    )
    assert s.as_json()["skipped"] == {"another helper": 2, "kernel threads": 1}
