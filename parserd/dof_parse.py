"""The pure DOF parser: ``(dof_helper_t bytes, DOF bytes) -> records``.

:func:`parse_dof` is the trust boundary's core.  It does no I/O, never raises
for any input, and answers either ``[Err(errno, message)]`` — the *first*
rule that failed — or the records of an accepted DOF::

    ( PROVIDER ( PROBE [ARGS_NATIVE [ARGS_XLAT ARGS_MAP]] TRACEPOINT{ntp} ){nprobes} )* EOF

Facts we rely on (upstream's ``libcommon/usdt_parser_dof.c`` at ``3b277fa0``, and
upstream's parser run on crafted DOF; the "appendix N" notes below name those runs):

* every DOF structure is fixed-size and little-endian (the encoding byte is
  checked against the only byte order we serve);
* section headers are read from the DOF exactly as received; relocations only
  change section *contents*, which everything after the relocation pass reads
  (upstream reads its headers live from the relocated buffer, so a relocation
  aimed at the header table could rewrite already-validated headers);
* a tracepoint's address is ``dofpr_addr + offset`` where ``dofpr_addr`` is the
  value after the SETX relocation pass (value ``> dofhp_addr``: left alone,
  the runtime loader relocated it; else ``+= dofhp_addr``).  Upstream applies
  that rule *only* through SETX relocations: a probe word without a
  relocation is used as it is (libusdt's absolute addresses rely on this);
* DIF/ECB/other sections are never interpreted, only bounds-checked.

Rule order (upstream's, with our additions marked *new*)
---------------------------------------------------------
A. Input framing: *new* helper is 80 bytes; *new* ``dofhp_mod`` has a NUL
   within its 64 bytes and the module name passes :mod:`common.names`; data
   size > ``max_dof_size`` (E2BIG); *new* data shorter than the 64-byte header;
   ``dofh_loadsz < 64``; *new* ``dofh_loadsz`` equals the data size
   (double-fetch defence: the device layer fetched exactly the header's size).
B. ``dof_slurp``: magic, model, encoding, version, DIF version, integer and
   tuple registers, ident padding, flags, ``secsize == 32``, section headers
   inside the data, ``secoff % 8``; per section: loadable type without LOAD,
   alignment, misalignment, bounds, STRTAB terminator; then every loaded
   URELHDR: header size/alignment, the strtab/reltab/target lookups, reltab
   entsize/alignment, each entry's type, offset, alignment; *new* a SETX that
   would wrap 2^64; *new* a relocation that overwrote a string table's final
   NUL.  *new*: more PROVIDER sections than ``max_providers`` (E2BIG).
C. Each PROVIDER section in section order: offset alignment, size for the DOF
   version, the strtab/probes/prargs/proffs[/prenoffs] lookups, provider name
   offset and length, *new* provider name policy, probes entsize (≥ 48, ≤ size),
   entsize % 8, *new* probes size a multiple of entsize, proffs entsize 4,
   proffs offset % 4, prargs entsize 1, *new* prenoffs entsize 4, *new* probes
   per DOF ≤ ``max_probes`` (E2BIG); then each probe: function name offset,
   length; probe name offset, length; offsets range; is-enabled range (v2+);
   zero offsets; args range; native types (offset, length each; then *new*
   policy); translated types (argmap index < nargc, offset, length each; then
   *new* policy); *new* function and probe name policy; *new*
   ``prv:mod:fun:prb`` fits a file name; *new* no duplicate ``prv:mod:fun:prb``
   in the DOF; *new* tracepoints per DOF ≤ ``max_tracepoints`` (E2BIG).
D. After all of one provider's probes passed C (upstream validates the whole
   provider before emitting it), per probe: unique offsets, unique is-enabled
   offsets (v3 only: v2 is-enabled offsets are range-checked, then dropped),
   at least one tracepoint, *new* no address past 2^64.

Where we differ from upstream
-----------------------------
For DOF that both accept, the records are upstream's.  The *new* checks above
refuse some DOF upstream accepts (appendix 11: it checks no names and reads
``dofhp_mod`` with an unbounded ``strlen``).  Every other difference:

=====================================================  ===============================================  ======================================================
upstream                                               ours                                             why
=====================================================  ===============================================  ======================================================
``DOF magic string mismatch: ^?ELF versus ^?DOF\\n``   ``DOF magic string mismatch: \\x7fELF versus      raw control bytes and a trailing newline in a message;
(raw ``\\x7f`` bytes, trailing newline, cut at NUL)     \\x7fDOF`` (escaped, no newline)                  a NUL in the ident cut upstream's text short
``DOF has invalid flag bits set: 1i``                  ``DOF has invalid flag bits set: 1``             ``%xi`` prints a stray ``i``
``misaligned section 2: 4, stated alignment 8i``       ``misaligned section 2: 4, stated alignment 8``  ``%xi`` prints a stray ``i``
``%zi``/``%li`` of u64 ≥ 2^63 (e.g. ``truncated       the unsigned value                               signed conversions of unsigned fields
section headers: -8, …``, ``bad relocation offset``,
``non-unique USDT offsets``); ``%i`` of u32 ≥ 2^31
(``invalid relocation type -1``, ``entsize -1``)
``%s`` of name bytes (raw, unbounded)                  escaped with ``names.printable``, at most the    messages are str, bounded (``MAX_MESSAGE``)
                                                       limit's bytes, then ``...``
alignment 0: ``misaligned section …, stated            ``bad section N alignment 0``                    "0 passes" the power-of-two test only to fail the next;
alignment 0i`` (accepted at offset 0)                                                                   reject it consistently (appendix 7)
zero-size STRTAB reads the byte before the section     ``section N: non-0-terminated string table``     no read outside the section (appendix 3)
u32 wrap in offset/is-enabled/args range checks        exact integer checks                             appendix 1
PRENOFFS entsize never checked                         ``invalid is-enabled offset entry size X``       appendix 2
signed-difference qsort comparator, false duplicates   numeric sort; wrap is                            appendix 4
when base+offset wraps 2^64                            ``tracepoint address overflow: B + O``
PROBES size not a multiple of entsize: tail dropped    ``invalid probe section size X, not a multiple   appendix 5
                                                       of entry size Y``
probe-level error: PROVIDER, ERR, other probes, EOF    exactly one ERR                                  appendix 8; design: one ERR
provider-level error: up to 4 ERRs (3 in relocation)   exactly one ERR, the first lookup that failed    appendix 9
several providers: records of earlier ones, then ERR   exactly one ERR                                  appendix 9
relocations rewrite headers read later, and string     headers read as received; a table whose final    upstream re-reads validated bytes after changing them
table NULs checked before relocation                   NUL was relocated away is refused
offset tables (PROFFS, PRENOFFS) sorted in place: a   sorted copies: names, addresses and headers      upstream's sort rewrites bytes it reads later; records
table laid over other data rewrites names, addresses   stay as validated, tracepoints are the sorted    for such a (malformed) DOF differ (tested in
or the header read after the sort                      values                                           ``test_offset_table_overlapping_the_string_table``)
=====================================================  ===============================================  ======================================================

Kept verbatim although odd: ``bad relocation offset: offset N, section size M)``
(stray parenthesis), ``bad native argument index for arg 0: 0 (max -1)`` when
``nargc`` is 0, and ``load size ... smaller than header`` / ``misaligned section
size`` are unreachable, as upstream (A rejects ``loadsz < 64`` first;
``secsize`` must be 32).

Cost: each check is O(1) except the loops over sections, relocation entries
and probes, which are bounded by the data size and the limits; a hostile
256 MiB DOF of 8M empty sections or 11M relocation entries takes seconds,
and is cut short by the receiver's per-request timeout.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from errno import E2BIG, EINVAL
from typing import Final, NamedTuple, NoReturn

from common.dof_abi import (
    DIF_DIR_NREGS,
    DIF_DTR_NREGS,
    DIF_VERSION_2,
    DOF_ENCODE_NATIVE,
    DOF_HDR,
    DOF_HELPER,
    DOF_ID_DIFIREG,
    DOF_ID_DIFTREG,
    DOF_ID_DIFVERS,
    DOF_ID_ENCODING,
    DOF_ID_MODEL,
    DOF_ID_PAD,
    DOF_ID_SIZE,
    DOF_ID_VERSION,
    DOF_MAG_STRING,
    DOF_MODEL_ILP32,
    DOF_MODEL_LP64,
    DOF_PROBE,
    DOF_PROVIDER,
    DOF_PROVIDER_V1,
    DOF_RELO_NONE,
    DOF_RELO_SETX,
    DOF_RELODESC,
    DOF_RELOHDR,
    DOF_SEC,
    DOF_SECF_LOAD,
    DOF_SECT_NONE,
    DOF_SECT_PRARGS,
    DOF_SECT_PRENOFFS,
    DOF_SECT_PROBES,
    DOF_SECT_PROFFS,
    DOF_SECT_PROVIDER,
    DOF_SECT_RELTAB,
    DOF_SECT_STRTAB,
    DOF_SECT_URELHDR,
    DOF_VERSION_1,
    DOF_VERSION_2,
    DOF_VERSION_3,
    DTRACE_ARGTYPELEN,
    DTRACE_FUNCNAMELEN,
    DTRACE_MODNAMELEN,
    DTRACE_NAMELEN,
    DTRACE_PROVNAMELEN,
    dof_sec_isloadable,
)
from common.limits import ParseLimits
from common.names import NAME_MAX, NameRefused, check_probespec, decode_name, printable
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
    Probe,
    Provider,
    ResultRecord,
    Tracepoint,
)
from parserd.rejection import ELLIPSIS, Rejected, clamp, reject

_DEFAULT_LIMITS: Final = ParseLimits()
_U64_MAX: Final = (1 << 64) - 1

_HDR: Final = DOF_HDR.struct
_SEC: Final = DOF_SEC.struct
_PROBE: Final = DOF_PROBE.struct
_RELOHDR: Final = DOF_RELOHDR.struct
_RELODESC: Final = DOF_RELODESC.struct
_HELPER: Final = DOF_HELPER.struct
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_LOADSZ_OFFSET: Final = DOF_HDR.offset("loadsz")
_OFFSET_ENTSIZE: Final = 4  # sizeof(uint32_t): PROFFS and PRENOFFS entries
_PRARGS_ENTSIZE: Final = 1  # sizeof(uint8_t)
_PROBE_ALIGN: Final = 8  # sizeof(uintptr_t): probes entsize granularity
_SETX_SIZE: Final = 8  # a SETX relocation rewrites one u64


class _Section(NamedTuple):
    """One ``dof_sec_t`` (field order as in the struct)."""

    type: int
    align: int
    flags: int
    entsize: int
    offset: int
    size: int


def _show(raw: bytes, truncated: bool) -> str:
    """A name from the DOF as upstream's ``%s`` would show it, escaped and bounded."""
    return printable(raw) + (ELLIPSIS if truncated else "")


def _policy_name(kind: str, raw: bytes) -> str:
    try:
        return decode_name(kind, raw)
    except NameRefused as err:
        reject(str(err))


def parse_dof(
    helper: bytes, dof: bytes, limits: ParseLimits = _DEFAULT_LIMITS
) -> list[ResultRecord]:
    """Validate *dof* (registered with the 80-byte *helper*) and return its records.

    Returns ``[Err(errno, message)]`` for the first rule that fails (module
    docstring), else ``[Provider, Probe, …, Eof()]``.  Never raises for any
    input bytes.
    """
    try:
        return _DofParser(bytes(helper), bytes(dof), limits).parse()
    except Rejected as rejected:
        return [Err(errno=rejected.errno, message=clamp(rejected.message))]


class _DofParser:
    """One parse; attributes hold what earlier rules established."""

    def __init__(self, helper: bytes, dof: bytes, limits: ParseLimits) -> None:
        self.helper = helper
        self.dof = dof  # as received: header and section headers are read from here
        self.data = dof  # section contents, after relocation
        self.limits = limits
        self.records: list[ResultRecord] = []
        self.version = 0
        self.secoff = 0
        self.secnum = 0
        self.nprobes = 0
        self.ntracepoints = 0
        self.seen: set[tuple[str, str, str]] = set()
        self.argtypes: dict[bytes, str] = {}
        self.native_runs: dict[bytes, ArgsNative] = {}  # by the run's bytes, NULs included
        self.xlat_runs: dict[bytes, ArgsXlat] = {}
        self.last_native: dict[int, tuple[bytes, ArgsNative]] = {}  # by argument count
        self.last_xlat: dict[int, tuple[bytes, ArgsXlat]] = {}
        self.argmaps: dict[bytes, ArgsMap] = {}

    def parse(self) -> list[ResultRecord]:
        module, ubase = self._check_helper()
        self._check_framing()
        nproviders = self._slurp(ubase)
        if nproviders > self.limits.max_providers:
            reject(
                f"provider count {nproviders} exceeds maximum "
                f"{self.limits.max_providers} (max_providers)",
                E2BIG,
            )
        if nproviders:
            for sec in self._sections():
                if sec.type == DOF_SECT_PROVIDER:
                    self._provider(module, sec)
        self.records.append(Eof())
        return self.records

    # --- A. input framing --------------------------------------------------------

    def _check_helper(self) -> tuple[str, int]:
        if len(self.helper) != DOF_HELPER.size:
            reject(f"helper size incorrect: expected {DOF_HELPER.size}, not {len(self.helper)}")
        mod_field, dofhp_addr, _dofhp_dof = _HELPER.unpack(self.helper)
        nul = mod_field.find(0)
        if nul < 0:
            reject(
                f"module name (dofhp_mod) is not NUL-terminated within {DTRACE_MODNAMELEN} bytes"
            )
        return _policy_name("module", mod_field[:nul]), dofhp_addr

    def _check_framing(self) -> None:
        size = len(self.dof)
        if size > self.limits.max_dof_size:
            reject(f"data size {size} exceeds maximum {self.limits.max_dof_size}", E2BIG)
        if size < DOF_HDR.size:
            reject(f"invalid data size {size}, smaller than header size {DOF_HDR.size}")
        (loadsz,) = _U64.unpack_from(self.dof, _LOADSZ_OFFSET)
        if loadsz < DOF_HDR.size:
            reject(f"invalid load size {loadsz}, smaller than header size {DOF_HDR.size}")
        if loadsz != size:
            reject(f"load size {loadsz} does not match data size {size}")

    # --- B. dof_slurp ----------------------------------------------------------------

    def _slurp(self, ubase: int) -> int:
        """Header and section checks, then relocations; returns the number of providers."""
        dof = self.dof
        ident, flags, _hdrsize, secsize, secnum, secoff, length, _filesz, _pad = _HDR.unpack_from(
            dof
        )
        magic = ident[: len(DOF_MAG_STRING)]
        if magic != DOF_MAG_STRING:
            reject(
                f"DOF magic string mismatch: {printable(magic)} versus {printable(DOF_MAG_STRING)}"
            )
        if ident[DOF_ID_MODEL] not in (DOF_MODEL_ILP32, DOF_MODEL_LP64):
            reject(f"DOF has invalid data model: {ident[DOF_ID_MODEL]}")
        if ident[DOF_ID_ENCODING] != DOF_ENCODE_NATIVE:
            reject(f"DOF encoding mismatch: {ident[DOF_ID_ENCODING]}, expected {DOF_ENCODE_NATIVE}")
        self.version = ident[DOF_ID_VERSION]
        if self.version not in (DOF_VERSION_1, DOF_VERSION_2, DOF_VERSION_3):
            reject(f"DOF version mismatch: {self.version}")
        if ident[DOF_ID_DIFVERS] != DIF_VERSION_2:
            reject(f"DOF uses unsupported instruction set {ident[DOF_ID_DIFVERS]}")
        if ident[DOF_ID_DIFIREG] > DIF_DIR_NREGS:
            reject(
                f"DOF uses too many integer registers: {ident[DOF_ID_DIFIREG]} > {DIF_DIR_NREGS}"
            )
        if ident[DOF_ID_DIFTREG] > DIF_DTR_NREGS:
            reject(f"DOF uses too many tuple registers: {ident[DOF_ID_DIFTREG]} > {DIF_DTR_NREGS}")
        for i in range(DOF_ID_PAD, DOF_ID_SIZE):
            if ident[i]:
                reject(f"DOF has invalid ident byte set: {i} = {ident[i]}")
        if flags:  # DOF_FL_VALID is 0: no flag is defined
            reject(f"DOF has invalid flag bits set: {flags:x}")
        if secsize != DOF_SEC.size:
            reject("incorrect section header size")
        seclen = secnum * secsize
        if secoff > length or seclen > length or secoff + seclen > length:
            reject(f"truncated section headers: {secoff}, {length}, {seclen}")
        if secoff % 8:
            reject("misaligned section headers")
        # "misaligned section size" (secsize % 8) cannot fail: secsize is 32.
        self.secoff = secoff
        self.secnum = secnum

        nproviders = 0
        relocations = False
        for i, (sec_type, align, sec_flags, _entsize, offset, size) in enumerate(
            _SEC.iter_unpack(memoryview(dof)[secoff : secoff + seclen])
        ):
            if not sec_flags & DOF_SECF_LOAD:
                if dof_sec_isloadable(sec_type):
                    reject(f"loadable section {i} with load flag unset")
                continue
            if align == 0 or align & (align - 1):
                reject(f"bad section {i} alignment {align:x}")
            if offset & (align - 1):
                reject(f"misaligned section {i}: {offset:x}, stated alignment {align:x}")
            if offset > length or size > length or offset + size > length:
                reject(
                    f"corrupt section {i} header: offset {offset:x}, size {size:x}, len {length:x}"
                )
            if sec_type == DOF_SECT_STRTAB and (size == 0 or dof[offset + size - 1] != 0):
                reject(f"section {i}: non-0-terminated string table")
            if sec_type == DOF_SECT_PROVIDER:
                nproviders += 1
            elif sec_type == DOF_SECT_URELHDR:
                relocations = True
        if relocations:
            self._relocate_all(ubase)
        return nproviders

    def _sections(self) -> Iterator[_Section]:
        """Each section header, as received (only used once they are validated)."""
        view = memoryview(self.dof)[self.secoff : self.secoff + self.secnum * DOF_SEC.size]
        for fields in _SEC.iter_unpack(view):  # a generator: secnum may be in the millions
            yield _Section._make(fields)

    def _sect(self, index: int, want: int) -> _Section:
        """``dof_sect()``: the loaded section *index*, of type *want* unless NONE."""
        if index >= self.secnum:
            reject(f"referenced section index {index} is invalid, above {self.secnum}")
        sec = _Section._make(_SEC.unpack_from(self.dof, self.secoff + index * DOF_SEC.size))
        if not sec.flags & DOF_SECF_LOAD:
            reject(f"referenced section {index} is not loadable")
        if want != DOF_SECT_NONE and sec.type != want:
            reject(f"referenced section {index} is the wrong type, {sec.type}, not {want}")
        return sec

    def _relocate_all(self, ubase: int) -> None:
        buf = bytearray(self.dof)
        changed = False
        for sec in self._sections():
            if sec.flags & DOF_SECF_LOAD and sec.type == DOF_SECT_URELHDR:
                changed |= self._relocate(buf, sec, ubase)
        if not changed:
            return
        for i, sec in enumerate(self._sections()):
            # Facts: a STRTAB's final NUL was checked before relocation; a SETX
            # aimed at a string table could have overwritten it.
            if (
                sec.flags & DOF_SECF_LOAD
                and sec.type == DOF_SECT_STRTAB
                and buf[sec.offset + sec.size - 1] != 0
            ):
                reject(f"section {i}: non-0-terminated string table after relocation")
        self.data = bytes(buf)

    def _relocate(self, buf: bytearray, sec: _Section, ubase: int) -> bool:
        """``dof_relocate()`` for one URELHDR; returns whether a value changed."""
        if sec.size < DOF_RELOHDR.size or sec.align != _OFFSET_ENTSIZE:
            reject(
                f"invalid relocation header: size {sec.size} (expected {DOF_RELOHDR.size}); "
                f"alignment {sec.align} (expected {_OFFSET_ENTSIZE})"
            )
        strtab, relsec, tgtsec = _RELOHDR.unpack_from(buf, sec.offset)
        self._sect(strtab, DOF_SECT_STRTAB)
        rs = self._sect(relsec, DOF_SECT_RELTAB)
        ts = self._sect(tgtsec, DOF_SECT_NONE)
        if rs.entsize < DOF_RELODESC.size or rs.align != _SETX_SIZE:
            reject(
                f"invalid relocation section: entsize {rs.entsize} "
                f"(expected {DOF_RELODESC.size}); alignment {rs.align} (expected {_SETX_SIZE})"
            )
        changed = False
        unpack_desc = _RELODESC.unpack_from
        # Entries are read from the live buffer, one at a time, as upstream
        # does: an earlier SETX may have rewritten a later entry.
        for pos in range(rs.offset, rs.offset + rs.size // rs.entsize * rs.entsize, rs.entsize):
            _name, rel_type, rel_offset, _data = unpack_desc(buf, pos)
            if rel_type == DOF_RELO_NONE:
                continue
            if rel_type != DOF_RELO_SETX:
                reject(f"invalid relocation type {rel_type}")
            if rel_offset >= ts.size or rel_offset + _SETX_SIZE > ts.size:
                reject(f"bad relocation offset: offset {rel_offset}, section size {ts.size})")
            target = ts.offset + rel_offset
            if target % _SETX_SIZE:
                reject("misaligned setx relo")
            (value,) = _U64.unpack_from(buf, target)
            if value > ubase:
                continue  # already relocated by the runtime loader
            if value + ubase > _U64_MAX:
                reject(f"setx relocation overflow: {value:x} + {ubase:x}")
            _U64.pack_into(buf, target, value + ubase)
            changed = True
        return changed

    # --- C and D. providers and probes -----------------------------------------------

    def _provider(self, module: str, sec: _Section) -> None:
        data = self.data
        version = self.version
        if sec.offset % 4:
            reject(f"misaligned section offset: {sec.offset:x}")
        layout = DOF_PROVIDER_V1 if version == DOF_VERSION_1 else DOF_PROVIDER
        if sec.size < layout.size:
            reject(f"provider section too small: {sec.size:x}")
        fields = layout.struct.unpack_from(data, sec.offset)
        strtab_i, probes_i, prargs_i, proffs_i, name_off = fields[:5]
        strtab = self._sect(strtab_i, DOF_SECT_STRTAB)
        probes = self._sect(probes_i, DOF_SECT_PROBES)
        prargs = self._sect(prargs_i, DOF_SECT_PRARGS)
        proffs = self._sect(proffs_i, DOF_SECT_PROFFS)
        enoffs: _Section | None = None
        if version != DOF_VERSION_1 and fields[10] != DOF_SECT_NONE:
            enoffs = self._sect(fields[10], DOF_SECT_PRENOFFS)

        str_off, str_size = strtab.offset, strtab.size
        str_end = str_off + str_size
        if name_off >= str_size:
            reject(f"invalid provider name offset: {name_off} > {str_size}")
        start = str_off + name_off
        nul = data.find(0, start, min(str_end, start + DTRACE_PROVNAMELEN))
        if nul < 0:
            raw = data[start : start + DTRACE_PROVNAMELEN]
            reject(f"provider name too long: {_show(raw, True)}")
        prov_raw = data[start:nul]
        prov = _policy_name("provider", prov_raw)

        if probes.entsize < DOF_PROBE.size or probes.entsize > probes.size:
            reject(f"invalid entry size {probes.entsize:x}, max {probes.size:x}")
        if probes.entsize % _PROBE_ALIGN:
            reject(f"misaligned entry size {probes.entsize:x}")
        if probes.size % probes.entsize:
            reject(
                f"invalid probe section size {probes.size:x}, "
                f"not a multiple of entry size {probes.entsize:x}"
            )
        if proffs.entsize != _OFFSET_ENTSIZE:
            reject(f"invalid entry size {proffs.entsize:x}")
        if proffs.offset % _OFFSET_ENTSIZE:
            reject(f"misaligned section offset {proffs.offset:x}")
        if prargs.entsize != _PRARGS_ENTSIZE:
            reject(f"invalid entry size {prargs.entsize:x}")
        if enoffs is not None and enoffs.entsize != _OFFSET_ENTSIZE:
            reject(f"invalid is-enabled offset entry size {enoffs.entsize:x}")
        nprobes = probes.size // probes.entsize
        self.nprobes += nprobes
        if self.nprobes > self.limits.max_probes:
            reject(
                f"probe count {self.nprobes} exceeds maximum {self.limits.max_probes} (max_probes)",
                E2BIG,
            )

        self.records.append(Provider(name=prov, nprobes=nprobes))
        self._probes(module, prov, prov_raw, strtab, probes, prargs, proffs, enoffs)

    def _probes(
        self,
        module: str,
        prov: str,
        prov_raw: bytes,
        strtab: _Section,
        probes: _Section,
        prargs: _Section,
        proffs: _Section,
        enoffs: _Section | None,
    ) -> None:
        """C.13 for every probe, then D.  The hot loop: names are local, work is cached."""
        data = self.data
        find = data.find
        append = self.records.append
        seen = self.seen
        version = self.version
        max_tracepoints = self.limits.max_tracepoints
        str_off, str_size = strtab.offset, strtab.size
        str_end = str_off + str_size
        proffs_off, proffs_size, proffs_entsize = proffs.offset, proffs.size, proffs.entsize
        prargs_off, prargs_size, prargs_entsize = prargs.offset, prargs.size, prargs.entsize
        keep_enabled = version >= DOF_VERSION_3 and enoffs is not None
        fixed_len = len(prov_raw) + len(module.encode()) + 3  # the three ":" of prv:mod:fun:prb
        deferred: Rejected | None = None  # first D-phase failure of this provider
        unpack_probe = _PROBE.unpack_from
        unpack_u32 = _U32.unpack_from

        for pos in range(probes.offset, probes.offset + probes.size, probes.entsize):
            (
                addr, func, name, nargv, xargv, argidx, offidx,
                nargc, xargc, noffs, enoffidx, nenoffs, _pad1, _pad2,
            ) = unpack_probe(data, pos)  # fmt: skip

            # C.13 a-b: function name, then (new) the name policy
            if func >= str_size:
                reject(f"invalid function name: strtab offset {func:x}, max {str_size:x}")
            start = str_off + func
            end = start + DTRACE_FUNCNAMELEN
            nul = find(0, start, end if end < str_end else str_end)
            if nul < 0:
                reject(f"function name {_show(data[start:end], True)} too long")
            fun_raw = data[start:nul]
            # c-d: probe name
            if name >= str_size:
                reject(f"invalid probe name: strtab offset {name:x}, max {str_size:x}")
            start = str_off + name
            end = start + DTRACE_NAMELEN
            nul = find(0, start, end if end < str_end else str_end)
            if nul < 0:
                reject(f"probe name {_show(data[start:end], True)} too long")
            prb_raw = data[start:nul]
            # e-f: offsets, in exact arithmetic (upstream's u32 products wrap)
            if (offidx + noffs) * proffs_entsize > proffs_size:
                reject(
                    f"invalid probe offset {offidx:x} (offset count {noffs:x}, "
                    f"section entsize {proffs_entsize:x}, size {proffs_size:x})"
                )
            if version != DOF_VERSION_1:
                if enoffs is None:
                    if enoffidx or nenoffs:
                        reject("is-enabled offsets with null section")
                elif (enoffidx + nenoffs) * enoffs.entsize > enoffs.size:
                    reject(
                        f"invalid is-enabled offset {enoffidx:x} (offset count {nenoffs:x}, "
                        f"section entsize {enoffs.entsize:x}, size {enoffs.size:x})"
                    )
                if noffs + nenoffs == 0:
                    reject("zero probe and is-enabled offsets")
            elif noffs == 0:
                reject("zero probe offsets")
            # g-i: arguments
            if (argidx + xargc) * prargs_entsize > prargs_size:
                reject(
                    f"invalid args, idx {argidx:x} (offset count {xargc:x}, "
                    f"section entsize {prargs_entsize:x}, size {prargs_size:x})"
                )
            native: ArgsNative | None = None
            if nargc:
                native = self._native(str_off, str_end, nargv, nargc)
            xlat: ArgsXlat | None = None
            argmap = b""
            if xargc:
                argmap = data[prargs_off + argidx : prargs_off + argidx + xargc]
                xlat = self._xlat(str_off, str_end, xargv, argmap, nargc)
            # new: the name policy, applied by the record itself (module, function,
            # probe; it cannot refuse anything else now that the arguments passed)
            nenabled = nenoffs if keep_enabled else 0
            ntp = noffs + nenabled
            try:
                fun = fun_raw.decode()
                prb = prb_raw.decode()
                probe = Probe(mod=module, fun=fun, prb=prb, ntp=ntp, nargc=nargc, xargc=xargc)
            except ValueError as err:  # UnicodeDecodeError or the policy's refusal
                _refuse_names(fun_raw, prb_raw, err)
            # new: the whole name fits a file name; no duplicate; tracepoint limit
            if fixed_len + len(fun_raw) + len(prb_raw) > NAME_MAX:
                try:
                    check_probespec(prov, module, fun, prb)
                except NameRefused as err:
                    reject(str(err))
            spec = (prov, fun, prb)
            if spec in seen:
                reject(f"duplicate probe {prov}:{module}:{fun}:{prb}")
            seen.add(spec)
            self.ntracepoints += ntp
            if self.ntracepoints > max_tracepoints:
                reject(
                    f"tracepoint count {self.ntracepoints} exceeds maximum "
                    f"{max_tracepoints} (max_tracepoints)",
                    E2BIG,
                )
            if deferred is not None:
                continue  # C checks go on; this provider's records are void anyway

            # D: validate_probe (sorted, unique, at least one, no wrap), then emit
            if noffs == 1:
                offs: list[int] | tuple[int, ...] = unpack_u32(data, proffs_off + 4 * offidx)
            else:
                offs = sorted(struct.unpack_from(f"<{noffs}I", data, proffs_off + 4 * offidx))
                deferred = _first_duplicate(offs, addr, "non-unique USDT offsets")
                if deferred is not None:
                    continue
            en_offs: list[int] | tuple[int, ...] = ()
            if nenabled:
                assert enoffs is not None  # keep_enabled implies the section
                en_offs = sorted(
                    struct.unpack_from(f"<{nenabled}I", data, enoffs.offset + 4 * enoffidx)
                )
                deferred = _first_duplicate(en_offs, addr, "non-unique is-enabled USDT offsets")
                if deferred is not None:
                    continue
            if ntp == 0:
                deferred = Rejected(EINVAL, "USDT probe with zero tracepoints")
                continue
            top = offs[-1] if offs else 0
            if en_offs and en_offs[-1] > top:
                top = en_offs[-1]
            if addr + top > _U64_MAX:
                deferred = Rejected(EINVAL, f"tracepoint address overflow: {addr:x} + {top:x}")
                continue

            append(probe)
            if native is not None:
                append(native)
                if xlat is not None:
                    append(xlat)
                    argmap_record = self.argmaps.get(argmap)
                    if argmap_record is None:
                        argmap_record = self.argmaps[argmap] = ArgsMap(map=list(argmap))
                    append(argmap_record)
            for off in offs:
                append(Tracepoint(addr=addr + off, is_enabled=False))
            for off in en_offs:
                append(Tracepoint(addr=addr + off, is_enabled=True))
        if deferred is not None:
            raise deferred

    # --- argument types --------------------------------------------------------------
    #
    # A probe's argument types are a run of consecutive C strings in the string
    # table.  Runs repeat (most probes of a program share a few signatures), so a
    # run whose bytes were validated before is recognised with one comparison and
    # its record is reused: records are immutable.

    def _native(self, str_off: int, str_end: int, nargv: int, nargc: int) -> ArgsNative:
        start = str_off + nargv
        last = self.last_native.get(nargc)
        if last is not None:
            run, record = last
            if start + len(run) <= str_end and self.data.startswith(run, start):
                return record
        end = self._walk_types("native", str_off, str_end, nargv, nargc, b"", 0)
        run = self.data[start:end]
        cached = self.native_runs.get(run)
        if cached is None:
            cached = self.native_runs[run] = ArgsNative(args=self._argtypes(run))
        self.last_native[nargc] = (run, cached)
        return cached

    def _xlat(self, str_off: int, str_end: int, xargv: int, argmap: bytes, nargc: int) -> ArgsXlat:
        start = str_off + xargv
        last = self.last_xlat.get(len(argmap))
        if last is not None and max(argmap) < nargc:
            run, record = last
            if start + len(run) <= str_end and self.data.startswith(run, start):
                return record
        end = self._walk_types("translated", str_off, str_end, xargv, len(argmap), argmap, nargc)
        run = self.data[start:end]
        cached = self.xlat_runs.get(run)
        if cached is None:
            cached = self.xlat_runs[run] = ArgsXlat(args=self._argtypes(run))
        self.last_xlat[len(argmap)] = (run, cached)
        return cached

    def _walk_types(
        self,
        kind: str,
        str_off: int,
        str_end: int,
        typeidx: int,
        count: int,
        argmap: bytes,
        nargc: int,
    ) -> int:
        """C.13 h/i: check *count* strings from strtab offset *typeidx*; returns the run's end.

        For translated types (*argmap* given) each type's argmap entry is
        checked first, as upstream interleaves them.
        """
        data = self.data
        str_size = str_end - str_off
        for k in range(count):
            if argmap and argmap[k] >= nargc:
                reject(f"bad native argument index for arg {k}: {argmap[k]} (max {nargc - 1})")
            if typeidx >= str_size:
                reject(f"bad {kind} argument type for arg {k}: {typeidx:x}")
            start = str_off + typeidx
            end = start + DTRACE_ARGTYPELEN
            nul = data.find(0, start, end if end < str_end else str_end)
            if nul < 0:
                reject(f"{kind} argument type for arg {k} too long: {_show(data[start:end], True)}")
            typeidx += nul - start + 1
        return str_off + typeidx

    def _argtypes(self, run: bytes) -> list[str]:
        """The policy on each type of a walked run (new; after upstream's checks)."""
        types = []
        for raw in run[:-1].split(b"\0"):
            value = self.argtypes.get(raw)
            if value is None:
                value = self.argtypes[raw] = _policy_name("argtype", raw)
            types.append(value)
        return types


def _refuse_names(fun_raw: bytes, prb_raw: bytes, err: ValueError) -> NoReturn:
    """Reject with the name policy's own message for the first refused name."""
    _policy_name("function", fun_raw)
    _policy_name("probe", prb_raw)
    reject(str(err))  # the record refused what the policy accepts: say what it said


def _first_duplicate(offs: list[int], base: int, what: str) -> Rejected | None:
    """The first duplicate in sorted *offs*, as upstream reports it (addresses in decimal)."""
    for i in range(1, len(offs)):
        if offs[i] == offs[i - 1]:
            return Rejected(EINVAL, f"{what} at {i}: {base + offs[i]} <= {base + offs[i - 1]}")
    return None
