"""One minimal DOF per validation rule: each breaks exactly that rule of a valid DOF.

Each row: an id, a function building the broken DOF (a valid base from
:mod:`tests.parser.dof_edit` plus one edit), and the exact error.  Rows are
grouped and ordered as the parser applies the rules (``parserd.dof_parse``
docstring; reference §2.5 A–D); rows marked *new* are checks upstream lacks,
*apx N* cover item N of the reference's appendix.  The whole answer must be
that one ``Err`` record: nothing before it, nothing after it.

Base v2 layout (``base_dof()``): sections 0 STRTAB (30 bytes), 1 PROBES,
2 PRARGS, 3 PROFFS, 4 RELTAB, 5 URELHDR, 6 PROVIDER; one probe ``fn:pr`` at
0x401000 with offsets 0x20, 0x10, native types ``int, char *``, one
translated type mapped to arg 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from errno import E2BIG, EINVAL

import pytest

from common.dof_abi import (
    DOF_SECT_COMMENTS,
    DOF_SECT_PROBES,
    DOF_SECT_PROFFS,
    DOF_SECT_PROVIDER,
    DOF_SECT_STRTAB,
)
from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper
from common.grammar import check_stream
from common.limits import ParseLimits
from common.records import Err
from parserd.dof_parse import parse_dof
from tests.parser.dof_edit import (
    Dof,
    base_dof,
    base_probe,
    base_v3,
    providers_dof,
)

U64_MAX = (1 << 64) - 1
STRTAB_SIZE = 0x1E  # of the base DOF: "\0fn\0pr\0int\0char *\0char *\0prov\0"


@dataclass(frozen=True)
class Rule:
    id: str
    make: Callable[[], Dof]
    message: str | Callable[[Dof], str]
    errno: int
    limits: ParseLimits


def rule(
    id: str,
    make: Callable[[], Dof],
    message: str | Callable[[Dof], str],
    errno: int = EINVAL,
    limits: ParseLimits | None = None,
) -> Rule:
    return Rule(id, make, message, errno, limits or ParseLimits())


# --- small builders used by several rows ---------------------------------------------


def with_helper(dof: Dof, helper: bytes) -> Dof:
    dof.helper = helper
    return dof


def resized(dof: Dof, size: int) -> Dof:
    """Cut or zero-extend the data, leaving ``dofh_loadsz`` as it was."""
    dof.data = dof.data[:size] + bytes(max(0, size - len(dof.data)))
    return dof


def provider_named(name: str | bytes) -> Dof:
    return Dof(build_dof([ProviderSpec(name, [base_probe()], relocate=True)]))


def unloaded_comments(dof: Dof, index: int) -> Dof:
    """Turn section *index* into a COMMENTS section without the LOAD flag."""
    return dof.set_section(index, "type", DOF_SECT_COMMENTS).set_section(index, "flags", 0)


def strtab_word_relocated() -> Dof:
    """A SETX aimed at the string table's last 8 bytes, with a base that fills byte 7.

    The provider name "provid" makes the table 32 bytes, so its last word is
    8-aligned; that word is b"\\0provid\\0" (< 2^56), relocated by +2^56.
    """
    dof = provider_named("provid")
    assert dof.sec(DOF_SECT_STRTAB).size == 32
    dof.set_relohdr("tgtsec", 0).set_relocation(0, "offset", 24)
    return dof.set_helper(addr=1 << 56)


def c_error_after_d_error() -> Dof:
    """Probe 0 has duplicate offsets (D), probe 1 a bad function offset (C)."""
    dof = base_dof(base_probe(offsets=[0x10, 0x10]), base_probe(name="pr2"))
    return dof.set_probe(1, "func", 999)


def d_error_before_next_provider() -> Dof:
    """Provider a's probe wraps 2^64 (D); provider b's probe has a bad function offset (C)."""
    dof = providers_dof("a", "b")
    dof.set_probe(0, "addr", U64_MAX)
    return dof.set_probe(0, "func", 999, provider=1)


def long_names_dof() -> Dof:
    dof = Dof(build_dof([ProviderSpec("p" * 63, [ProbeSpec("f" * 127, "n" * 63, [0x4])])]))
    return dof.set_helper(b"m" * 63)


P = DOF_SECT_PROBES

RULES: list[Rule] = [
    # --- A. input framing ----------------------------------------------------------------
    rule("helper-short", lambda: with_helper(base_dof(), build_helper()[:79]),
         "helper size incorrect: expected 80, not 79"),  # new
    rule("helper-mod-no-nul", lambda: base_dof().set_helper(b"m" * 64),
         "module name (dofhp_mod) is not NUL-terminated within 64 bytes"),  # new, apx 11
    rule("helper-mod-slash", lambda: base_dof().set_helper(b"../x"),
         "module name \"../x\" contains forbidden character '/'"),  # new
    rule("helper-mod-empty", lambda: base_dof().set_helper(b""),
         "module name is empty"),  # new
    rule("helper-mod-utf8", lambda: base_dof().set_helper(b"\xff"),
         r'module name "\\xff" is not valid UTF-8'),  # new
    rule("data-over-limit", lambda: base_dof(),
         lambda d: f"data size {len(d)} exceeds maximum {len(d) - 1}",
         E2BIG, ParseLimits(max_dof_size=464 - 1)),
    rule("data-under-header", lambda: resized(base_dof(), 63),
         "invalid data size 63, smaller than header size 64"),  # new
    rule("loadsz-under-header", lambda: base_dof().set_header("loadsz", 63),
         "invalid load size 63, smaller than header size 64"),
    rule("loadsz-above-data", lambda: base_dof().set_header("loadsz", 472),
         "load size 472 does not match data size 464"),  # new: double fetch
    rule("loadsz-below-data", lambda: resized(base_dof(), 472),
         "load size 464 does not match data size 472"),  # new: double fetch
    # --- B. header -----------------------------------------------------------------------
    rule("magic-elf", lambda: base_dof().set_bytes(0, b"\x7fELF"),
         r"DOF magic string mismatch: \x7fELF versus \x7fDOF"),
    rule("magic-nul", lambda: base_dof().set_ident(0, 0),
         r"DOF magic string mismatch: \x00DOF versus \x7fDOF"),
    rule("model-0", lambda: base_dof().set_ident(4, 0), "DOF has invalid data model: 0"),
    rule("model-3", lambda: base_dof().set_ident(4, 3), "DOF has invalid data model: 3"),
    rule("encoding-msb", lambda: base_dof().set_ident(5, 2), "DOF encoding mismatch: 2, expected 1"),
    rule("version-0", lambda: base_dof().set_ident(6, 0), "DOF version mismatch: 0"),
    rule("version-4", lambda: base_dof().set_ident(6, 4), "DOF version mismatch: 4"),
    rule("dif-version", lambda: base_dof().set_ident(7, 1), "DOF uses unsupported instruction set 1"),
    rule("int-registers", lambda: base_dof().set_ident(8, 9),
         "DOF uses too many integer registers: 9 > 8"),
    rule("tuple-registers", lambda: base_dof().set_ident(9, 9),
         "DOF uses too many tuple registers: 9 > 8"),
    rule("ident-pad-10", lambda: base_dof().set_ident(10, 1), "DOF has invalid ident byte set: 10 = 1"),
    rule("ident-pad-15", lambda: base_dof().set_ident(15, 255),
         "DOF has invalid ident byte set: 15 = 255"),
    rule("flags", lambda: base_dof().set_header("flags", 1),
         "DOF has invalid flag bits set: 1"),  # apx 10: no stray "i"
    rule("flags-hex", lambda: base_dof().set_header("flags", 0xDEADBEEF),
         "DOF has invalid flag bits set: deadbeef"),
    rule("secsize-0", lambda: base_dof().set_header("secsize", 0), "incorrect section header size"),
    rule("secsize-24", lambda: base_dof().set_header("secsize", 24), "incorrect section header size"),
    rule("secsize-40", lambda: base_dof().set_header("secsize", 40), "incorrect section header size"),
    rule("secnum-past-end", lambda: base_dof().set_header("secnum", 0x10000),
         "truncated section headers: 64, 464, 2097152"),
    rule("secoff-past-end", lambda: base_dof().set_header("secoff", U64_MAX - 7),
         "truncated section headers: 18446744073709551608, 464, 224"),  # apx 10: unsigned
    rule("secoff-plus-seclen", lambda: base_dof().set_header("secoff", 456),
         "truncated section headers: 456, 464, 224"),
    rule("secoff-misaligned", lambda: base_dof().set_header("secoff", 68),
         "misaligned section headers"),
    # --- B.15 sections -------------------------------------------------------------------
    rule("load-flag-unset", lambda: base_dof().set_section(1, "flags", 0),
         "loadable section 1 with load flag unset"),
    rule("align-3", lambda: base_dof().set_section(1, "align", 3), "bad section 1 alignment 3"),
    rule("align-0", lambda: base_dof().set_section(1, "align", 0),
         "bad section 1 alignment 0"),  # apx 7
    rule("section-misaligned", lambda: base_dof().set_section(3, "align", 8),
         "misaligned section 3: 174, stated alignment 8"),  # apx 10: no stray "i"
    rule("section-size-past-end", lambda: base_dof().set_section(1, "size", 464),
         "corrupt section 1 header: offset 140, size 1d0, len 1d0"),
    rule("section-offset-huge", lambda: base_dof().set_section(1, "offset", U64_MAX - 7),
         "corrupt section 1 header: offset fffffffffffffff8, size 30, len 1d0"),
    rule("section-offset-size-wrap",
         lambda: base_dof().set_section(1, "offset", 8).set_section(1, "size", U64_MAX - 7),
         "corrupt section 1 header: offset 8, size fffffffffffffff8, len 1d0"),
    rule("strtab-unterminated",
         lambda: base_dof().set_bytes(288 + STRTAB_SIZE - 1, b"x"),
         "section 0: non-0-terminated string table"),
    rule("strtab-empty", lambda: base_dof().set_section(0, "size", 0),
         "section 0: non-0-terminated string table"),  # apx 3
    rule("strtab-empty-at-0",
         lambda: base_dof().set_section(0, "size", 0).set_section(0, "offset", 0),
         "section 0: non-0-terminated string table"),  # apx 3: no read before the data
    # --- B.16 relocations ----------------------------------------------------------------
    rule("relohdr-small", lambda: base_dof().set_section(5, "size", 8),
         "invalid relocation header: size 8 (expected 12); alignment 4 (expected 4)"),
    rule("relohdr-align", lambda: base_dof().set_section(5, "align", 8),
         "invalid relocation header: size 12 (expected 12); alignment 8 (expected 4)"),
    rule("relohdr-strtab-index", lambda: base_dof().set_relohdr("strtab", 99),
         "referenced section index 99 is invalid, above 7"),
    rule("relohdr-strtab-unloaded",
         lambda: unloaded_comments(base_dof(), 2).set_relohdr("strtab", 2),
         "referenced section 2 is not loadable"),
    rule("relohdr-relsec-type", lambda: base_dof().set_relohdr("relsec", 0),
         "referenced section 0 is the wrong type, 8, not 10"),
    rule("relohdr-tgtsec-index", lambda: base_dof().set_relohdr("tgtsec", 7),
         "referenced section index 7 is invalid, above 7"),
    rule("relohdr-all-bad",  # apx 9: upstream sends 3 ERRs
         lambda: base_dof().set_relohdr("strtab", 9).set_relohdr("relsec", 8)
         .set_relohdr("tgtsec", 7),
         "referenced section index 9 is invalid, above 7"),
    rule("reltab-entsize-16", lambda: base_dof().set_section(4, "entsize", 16),
         "invalid relocation section: entsize 16 (expected 24); alignment 8 (expected 8)"),
    rule("reltab-entsize-0", lambda: base_dof().set_section(4, "entsize", 0),
         "invalid relocation section: entsize 0 (expected 24); alignment 8 (expected 8)"),
    rule("reltab-align", lambda: base_dof().set_section(4, "align", 4),
         "invalid relocation section: entsize 24 (expected 24); alignment 4 (expected 8)"),
    rule("reloc-type", lambda: base_dof().set_relocation(0, "type", 2),
         "invalid relocation type 2"),
    rule("reloc-type-u32", lambda: base_dof().set_relocation(0, "type", 0xFFFFFFFF),
         "invalid relocation type 4294967295"),  # apx 10: upstream prints -1
    rule("reloc-offset-at-end", lambda: base_dof().set_relocation(0, "offset", 48),
         "bad relocation offset: offset 48, section size 48)"),
    rule("reloc-offset-straddles", lambda: base_dof().set_relocation(0, "offset", 44),
         "bad relocation offset: offset 44, section size 48)"),
    rule("reloc-offset-huge", lambda: base_dof().set_relocation(0, "offset", U64_MAX - 7),
         "bad relocation offset: offset 18446744073709551608, section size 48)"),  # apx 10
    rule("reloc-misaligned", lambda: base_dof().set_relocation(0, "offset", 4),
         "misaligned setx relo"),
    rule("reloc-overflow", lambda: base_dof().set_helper(addr=U64_MAX - 0xFFF),
         "setx relocation overflow: 401000 + fffffffffffff000"),  # new
    rule("reloc-strtab-terminator", strtab_word_relocated,
         "section 0: non-0-terminated string table after relocation"),  # new
    rule("providers-limit", lambda: providers_dof("a", "b"),
         "provider count 2 exceeds maximum 1 (max_providers)", E2BIG,
         ParseLimits(max_providers=1)),  # new
    # --- C. provider ---------------------------------------------------------------------
    rule("provider-misaligned",
         lambda: base_dof().set_section(6, "align", 1).set_section(6, "offset", 421)
         .set_section(6, "size", 43),
         "misaligned section offset: 1a5"),
    rule("provider-small", lambda: base_dof().set_section(6, "size", 43),
         "provider section too small: 2b"),
    rule("provider-small-v1", lambda: base_dof(version=1).set_section(6, "size", 39),
         "provider section too small: 27"),
    rule("provider-strtab-index", lambda: base_dof().set_provider("strtab", 99),
         "referenced section index 99 is invalid, above 7"),
    rule("provider-probes-type", lambda: base_dof().set_provider("probes", 0),
         "referenced section 0 is the wrong type, 8, not 16"),
    rule("provider-prargs-unloaded",
         lambda: unloaded_comments(base_dof(), 5).set_provider("prargs", 5),
         "referenced section 5 is not loadable"),
    rule("provider-proffs-type", lambda: base_dof().set_provider("proffs", 2),
         "referenced section 2 is the wrong type, 17, not 18"),
    rule("provider-all-four-bad",  # apx 9: upstream sends 4 ERRs
         lambda: base_dof().set_provider("strtab", 0xFFFFFFFF).set_provider("probes", 0)
         .set_provider("prargs", 0).set_provider("proffs", 0),
         "referenced section index 4294967295 is invalid, above 7"),
    rule("provider-prenoffs-type", lambda: base_dof().set_provider("prenoffs", 1),
         "referenced section 1 is the wrong type, 16, not 26"),
    rule("provider-name-offset", lambda: base_dof().set_provider("name", STRTAB_SIZE),
         "invalid provider name offset: 30 > 30"),
    rule("provider-name-long", lambda: provider_named("p" * 64),
         "provider name too long: " + "p" * 64 + "..."),
    rule("provider-name-colon", lambda: provider_named("a:b"),
         "provider name \"a:b\" contains forbidden character ':'"),  # new
    rule("provider-name-dot", lambda: provider_named("."),
         'provider name "." is not allowed'),  # new
    rule("provider-name-empty", lambda: base_dof().set_provider("name", 0),
         "provider name is empty"),  # new
    rule("probes-entsize-small", lambda: base_dof().set_section(1, "entsize", 40),
         "invalid entry size 28, max 30"),
    rule("probes-entsize-big", lambda: base_dof().set_section(1, "entsize", 0x60),
         "invalid entry size 60, max 30"),
    rule("probes-entsize-misaligned",
         lambda: base_dof(base_probe(), base_probe(name="pr2")).set_section(1, "entsize", 52),
         "misaligned entry size 34"),
    rule("probes-size-not-multiple", lambda: base_dof().set_section(1, "size", 0x50),
         "invalid probe section size 50, not a multiple of entry size 30"),  # new, apx 5
    rule("proffs-entsize", lambda: base_dof().set_section(3, "entsize", 8), "invalid entry size 8"),
    rule("proffs-misaligned",
         lambda: base_dof().set_section(3, "align", 2).set_section(3, "offset", 374),
         "misaligned section offset 176"),
    rule("prargs-entsize", lambda: base_dof().set_section(2, "entsize", 2), "invalid entry size 2"),
    rule("prenoffs-entsize-0", lambda: base_v3().set_section(4, "entsize", 0),
         "invalid is-enabled offset entry size 0"),  # new, apx 2
    rule("prenoffs-entsize-8", lambda: base_v3().set_section(4, "entsize", 8),
         "invalid is-enabled offset entry size 8"),  # new
    rule("probes-limit", lambda: base_dof(base_probe(), base_probe(name="pr2")),
         "probe count 2 exceeds maximum 1 (max_probes)", E2BIG, ParseLimits(max_probes=1)),
    rule("probes-limit-across-providers", lambda: providers_dof("a", "b"),
         "probe count 4 exceeds maximum 3 (max_probes)", E2BIG, ParseLimits(max_probes=3)),
    # --- C.13 probes -------------------------------------------------------------------
    rule("func-offset", lambda: base_dof().set_probe(0, "func", STRTAB_SIZE),
         "invalid function name: strtab offset 1e, max 1e"),
    rule("func-long", lambda: base_dof(base_probe(func="f" * 128)),
         "function name " + "f" * 128 + "... too long"),
    rule("name-offset", lambda: base_dof().set_probe(0, "name", STRTAB_SIZE),
         "invalid probe name: strtab offset 1e, max 1e"),
    rule("name-long", lambda: base_dof(base_probe(name="n" * 64)),
         "probe name " + "n" * 64 + "... too long"),
    rule("func-slash", lambda: base_dof(base_probe(func="a/b")),
         "function name \"a/b\" contains forbidden character '/'"),  # new
    rule("func-utf8", lambda: base_dof(base_probe(func=b"\xc3(")),
         r'function name "\\xc3(" is not valid UTF-8'),  # new
    rule("name-dotdot", lambda: base_dof(base_probe(name="..")),
         'probe name ".." is not allowed'),  # new
    rule("name-newline", lambda: base_dof(base_probe(name="a\nb")),
         "probe name \"a\\nb\" contains forbidden character '\\n'"),  # new
    rule("offsets-u32-wrap", lambda: base_dof().set_probe(0, "offidx", 0x40000000),
         "invalid probe offset 40000000 (offset count 2, section entsize 4, size 8)"),  # apx 1
    rule("offsets-past-end", lambda: base_dof().set_probe(0, "offidx", 1),
         "invalid probe offset 1 (offset count 2, section entsize 4, size 8)"),
    rule("enoffs-no-section", lambda: base_dof().set_probe(0, "nenoffs", 1),
         "is-enabled offsets with null section"),
    rule("enoffidx-no-section", lambda: base_dof().set_probe(0, "enoffidx", 1),
         "is-enabled offsets with null section"),
    rule("enoffs-u32-wrap", lambda: base_v3().set_probe(0, "enoffidx", 0x40000000),
         "invalid is-enabled offset 40000000 (offset count 1, section entsize 4, size 4)"),  # apx 1
    rule("enoffs-past-end", lambda: base_v3().set_probe(0, "nenoffs", 2),
         "invalid is-enabled offset 0 (offset count 2, section entsize 4, size 4)"),
    rule("no-offsets", lambda: base_dof().set_probe(0, "noffs", 0),
         "zero probe and is-enabled offsets"),
    rule("no-offsets-v1", lambda: base_dof(version=1).set_probe(0, "noffs", 0),
         "zero probe offsets"),
    rule("args-u32-wrap", lambda: base_dof().set_probe(0, "argidx", 0xFFFFFFFF),
         "invalid args, idx ffffffff (offset count 1, section entsize 1, size 1)"),
    rule("native-offset", lambda: base_dof().set_probe(0, "nargv", STRTAB_SIZE),
         "bad native argument type for arg 0: 1e"),
    rule("native-runs-off-strtab", lambda: base_dof().set_probe(0, "nargv", STRTAB_SIZE - 1),
         "bad native argument type for arg 1: 1e"),
    rule("native-long", lambda: base_dof(base_probe(native=["t" * 128])),
         "native argument type for arg 0 too long: " + "t" * 128 + "..."),
    rule("native-empty", lambda: base_dof(base_probe(native=["int", ""])),
         "argument type is empty"),  # new
    rule("native-control", lambda: base_dof(base_probe(native=["in\x01t", "int"])),
         "argument type \"in\\x01t\" contains forbidden character '\\x01'"),  # new
    rule("argmap-equals-nargc", lambda: base_dof(base_probe(argmap=[2])),
         "bad native argument index for arg 0: 2 (max 1)"),  # newest: index < nargc
    rule("argmap-without-native", lambda: base_dof().set_probe(0, "nargc", 0),
         "bad native argument index for arg 0: 1 (max -1)"),
    rule("xlat-offset", lambda: base_dof().set_probe(0, "xargv", STRTAB_SIZE),
         "bad translated argument type for arg 0: 1e"),
    rule("xlat-long", lambda: base_dof(base_probe(xlat=["x" * 128])),
         "translated argument type for arg 0 too long: " + "x" * 128 + "..."),
    rule("xlat-control", lambda: base_dof(base_probe(xlat=["\x7f"])),
         "argument type \"\\x7f\" contains forbidden character '\\x7f'"),  # new
    rule("probespec-too-long", long_names_dof,
         f'probe "{"p" * 63}:{"m" * 63}:{"f" * 127}:{"n" * 63}" too long for a file name: '
         "319 bytes > 255"),  # new
    rule("duplicate-probe", lambda: base_dof(base_probe(), base_probe()),
         "duplicate probe prov:a.out:fn:pr"),  # new, apx 11
    rule("duplicate-provider", lambda: providers_dof("x", "x"),
         "duplicate probe x:a.out:f:a"),  # new
    rule("tracepoints-limit", lambda: base_dof(),
         "tracepoint count 2 exceeds maximum 1 (max_tracepoints)", E2BIG,
         ParseLimits(max_tracepoints=1)),  # new
    rule("tracepoints-limit-v3", lambda: base_v3(),
         "tracepoint count 3 exceeds maximum 2 (max_tracepoints)", E2BIG,
         ParseLimits(max_tracepoints=2)),  # new: kept is-enabled ones count
    # --- D. emitting a probe ---------------------------------------------------------------
    rule("duplicate-offsets", lambda: base_dof(base_probe(offsets=[0x20, 0x10, 0x20])),
         "non-unique USDT offsets at 2: 4198432 <= 4198432"),
    rule("duplicate-enoffs", lambda: base_dof(base_probe(enoffsets=[0x8, 0x8])),
         "non-unique is-enabled USDT offsets at 1: 4198408 <= 4198408"),
    rule("v2-only-is-enabled", lambda: base_dof(base_probe(offsets=[], enoffsets=[4]), version=2),
         "USDT probe with zero tracepoints"),  # apx 8: no stream continues
    rule("address-wrap",
         lambda: base_dof(base_probe(addr=U64_MAX - 0xF, offsets=[0x10]), relocate=False),
         "tracepoint address overflow: fffffffffffffff0 + 10"),  # new
    rule("address-wrap-not-duplicate",
         lambda: base_dof(base_probe(addr=U64_MAX - 0xF, offsets=[0x8, 0x18]), relocate=False),
         "tracepoint address overflow: fffffffffffffff0 + 18"),  # apx 4
    rule("c-rule-before-d-rule", c_error_after_d_error,
         lambda d: f"invalid function name: strtab offset 3e7, max {d.sec(DOF_SECT_STRTAB).size:x}"),
    rule("d-rule-before-next-provider", d_error_before_next_provider,
         "tracepoint address overflow: ffffffffffffffff + 4"),
]  # fmt: skip


@pytest.mark.parametrize("case", RULES, ids=[r.id for r in RULES])
def test_rule(case: Rule) -> None:
    dof = case.make()
    message = case.message(dof) if callable(case.message) else case.message
    assert parse_dof(dof.helper, bytes(dof.data), case.limits) == [
        Err(errno=case.errno, message=message)
    ]


def test_rule_ids_unique() -> None:
    assert len({r.id for r in RULES}) == len(RULES)


def test_rule_bases_are_valid() -> None:
    """Every base the table edits is accepted unedited, so each row breaks only its rule."""
    for dof in (
        base_dof(),
        base_dof(version=1),
        base_v3(),
        providers_dof("a", "b"),
        base_dof(base_probe(), base_probe(name="pr2")),
        provider_named("provid"),
    ):
        assert check_stream(parse_dof(dof.helper, bytes(dof.data))).error is None


def test_limit_admits_exact_counts() -> None:
    """Limits are maxima, not bounds to stay under: exactly the limit is accepted."""
    dof = providers_dof("a", "b")
    limits = ParseLimits(max_dof_size=len(dof), max_providers=2, max_probes=4, max_tracepoints=4)
    assert check_stream(parse_dof(dof.helper, bytes(dof.data), limits)).error is None


def test_v2_dropped_is_enabled_not_counted() -> None:
    dof = base_dof(base_probe(enoffsets=[0x8]), version=2)
    assert (
        check_stream(parse_dof(dof.helper, bytes(dof.data), ParseLimits(max_tracepoints=2))).error
        is None
    )


def test_strtab_layout_assumed_by_table() -> None:
    assert base_dof().sec(DOF_SECT_STRTAB).size == STRTAB_SIZE
    assert base_dof().sec(DOF_SECT_STRTAB).offset == 288
    assert base_dof().sec(DOF_SECT_PROFFS).offset == 0x174
    assert base_dof().sec(DOF_SECT_PROVIDER).offset == 0x1A4
    assert base_dof().sec(P).offset == 0x140
    assert len(base_dof()) == 464
