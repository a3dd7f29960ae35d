"""The sandboxed locate step for catch-up (``LocateNotes`` with ``dof``): ``.SUNW_dof`` too.

Catch-up (``dtprobed/daemon/catchup.py``) asks the parser where an object's probes are:
``.note.usdt`` (as for HASUSDT) or an allocated ``.SUNW_dof``, whose bytes it then reads
from the process's memory. Checked on objects built as ``dtrace -G`` <= 2.0.2 built them
(:mod:`tests.support.sunw_dof`), on a real dtrace 2.0.7 notes object, on libc, and on
copies of a ``.SUNW_dof`` object with its section header altered; and through the real
sandboxed child.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from common.dof_abi import DOF_HELPER
from common.elf_abi import EHDR, SHDR
from common.errors import RequestRejected
from common.limits import ParseLimits
from common.records import Err, NotesLocation
from dtprobed.children.parser import ParserChild
from parserd.elf_notes import locate_notes
from tests.integration.test_sunw_dof import LIB, MAIN
from tests.support import sunw_dof as sd

NOTES = Path(__file__).resolve().parent / "fixtures" / "notes" / "fx_exec"
BASE = 0x7F12_3456_0000


def helper(name: bytes) -> bytes:
    return DOF_HELPER.pack(name.ljust(64, b"\0"), BASE, 0)


def locate(data: bytes, *, dof: bool = True, limits: ParseLimits | None = None) -> object:
    [answer] = locate_notes(
        helper(b"obj"), len(data), lambda off, n: data[off : off + n], limits, dof=dof
    )
    return answer


@pytest.fixture(scope="module")
def objects() -> dict[str, sd.BuiltObject]:
    try:
        return {
            "exe": sd.build_sunw_object(MAIN, kind="exe", name="sunwexe"),
            "pie": sd.build_sunw_object(MAIN, kind="pie", name="sunwpie"),
            "lib": sd.build_sunw_object(LIB, kind="lib", name="libsunwlib.so"),
        }
    except sd.BuildError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.mark.parametrize("kind", ["exe", "pie", "lib"])
def test_sunw_dof_located(objects: dict[str, sd.BuiltObject], kind: str) -> None:
    obj = objects[kind]
    sec = obj.dof_section
    assert sec is not None
    data = obj.path.read_bytes()
    where = locate(data)
    assert isinstance(where, NotesLocation), where
    assert (where.dof_addr, where.dof_size, where.notes_found) == (sec.addr, sec.size, False)
    assert where.base == (0 if kind == "exe" else BASE)  # ET_EXEC: absolute addresses
    assert (where.notes_size, where.rodata_size) == (0, 0)
    # without dof (HASUSDT's locate), the same object has no probes
    refused = locate(data, dof=False)
    assert isinstance(refused, Err) and "no .note.usdt section" in refused.message


def test_notes_object_is_located_as_before() -> None:
    data = NOTES.read_bytes()
    with_dof, without = locate(data), locate(data, dof=False)
    assert isinstance(with_dof, NotesLocation) and isinstance(without, NotesLocation)
    assert with_dof == without  # notes found, no .SUNW_dof: nothing else differs
    assert with_dof.notes_found and with_dof.dof_size == 0


def test_object_without_probes() -> None:
    data = Path("/usr/lib/x86_64-linux-gnu/libc.so.6").read_bytes()
    answer = locate(data)
    assert isinstance(answer, Err) and "no .note.usdt section" in answer.message


def _patched(obj: sd.BuiltObject, *, flags: int | None = None, size: int | None = None) -> bytes:
    """The object with its .SUNW_dof section header's sh_flags or sh_size replaced."""
    data = bytearray(obj.path.read_bytes())
    head = EHDR.unpack_from(data)
    shoff, shnum, shstrndx = head[6], head[12], head[13]
    strtab = SHDR.unpack_from(data, shoff + shstrndx * SHDR.size)
    for i in range(shnum):
        at = shoff + i * SHDR.size
        fields = list(SHDR.unpack_from(data, at))
        name_at = strtab[4] + fields[0]
        if bytes(data[name_at : name_at + 10]) == b".SUNW_dof\0":
            if flags is not None:
                fields[2] = flags
            if size is not None:
                fields[5] = size
            SHDR.pack_into(data, at, *fields)
            return bytes(data)
    raise AssertionError("no .SUNW_dof")


def test_sunw_dof_must_be_allocated_nonempty_and_bounded(
    objects: dict[str, sd.BuiltObject],
) -> None:
    obj = objects["pie"]
    answer = locate(_patched(obj, flags=0))
    assert isinstance(answer, Err) and "is not allocated" in answer.message, answer
    answer = locate(_patched(obj, size=0))
    assert isinstance(answer, Err) and "is empty" in answer.message, answer
    small = ParseLimits(max_dof_size=256)
    answer = locate(obj.path.read_bytes(), limits=small)
    assert isinstance(answer, Err) and answer.errno == errno.E2BIG, answer


def test_through_the_sandboxed_child(objects: dict[str, sd.BuiltObject]) -> None:
    obj = objects["lib"]
    data = obj.path.read_bytes()
    child = ParserChild(limits=ParseLimits(), timeout=30.0, log=logging.getLogger("t.parser"))
    try:
        where = child.locate_notes(
            helper(b"libsunwlib.so"), len(data), lambda off, n: data[off : off + n], dof=True
        )
        assert obj.dof_section is not None
        assert (where.dof_addr, where.dof_size, where.notes_found) == (
            obj.dof_section.addr,
            obj.dof_section.size,
            False,
        )
        with pytest.raises(RequestRejected, match=r"no \.note\.usdt section"):
            child.locate_notes(helper(b"libsunwlib.so"), len(data), lambda o, n: data[o : o + n])
    finally:
        child.stop()
