"""The DOF (DTrace Object Format) layouts a helper registration carries.

Facts we rely on (upstream's ``include/dtrace/dof.h``, ``helpers.h``, ``universal.h``;
the sizes are checked at import, below):

* every field is native-endian and fixed-size; x86_64 and aarch64 are
  little-endian, which is all this daemon serves;
* the structs are the same for 32- and 64-bit producers (no pointers in them);
* only ``dof_provider_t`` differs between DOF versions: 40 bytes in v1, 44
  from v2 (``dofpv_prenoffs`` appended);
* ``dof_probe_t`` is 48 bytes in every version.
"""

from __future__ import annotations

from typing import Final

from common.layout import Layout, map_namespace

# --- dof_hdr_t.dofh_ident[] ------------------------------------------------
DOF_ID_MAG0: Final = 0
DOF_ID_MAG1: Final = 1
DOF_ID_MAG2: Final = 2
DOF_ID_MAG3: Final = 3
DOF_ID_MODEL: Final = 4
DOF_ID_ENCODING: Final = 5
DOF_ID_VERSION: Final = 6
DOF_ID_DIFVERS: Final = 7
DOF_ID_DIFIREG: Final = 8
DOF_ID_DIFTREG: Final = 9
DOF_ID_PAD: Final = 10
DOF_ID_SIZE: Final = 16

DOF_MAG_STRING: Final = b"\x7fDOF"
DOF_MODEL_ILP32: Final = 1
DOF_MODEL_LP64: Final = 2
DOF_ENCODE_LSB: Final = 1
DOF_ENCODE_MSB: Final = 2
DOF_ENCODE_NATIVE: Final = DOF_ENCODE_LSB
DOF_VERSION_1: Final = 1
DOF_VERSION_2: Final = 2
DOF_VERSION_3: Final = 3
DIF_VERSION_2: Final = 2
DIF_DIR_NREGS: Final = 8  # DIF integer registers
DIF_DTR_NREGS: Final = 8  # DIF tuple registers

DOF_FL_VALID: Final = 0  # no header flag is defined
DOF_SECF_LOAD: Final = 1

# --- section types (dof_sec_t.dofs_type) ------------------------------------
DOF_SECT_NONE: Final = 0
DOF_SECT_COMMENTS: Final = 1
DOF_SECT_SOURCE: Final = 2
DOF_SECT_ECBDESC: Final = 3
DOF_SECT_PROBEDESC: Final = 4
DOF_SECT_ACTDESC: Final = 5
DOF_SECT_DIFOHDR: Final = 6
DOF_SECT_DIF: Final = 7
DOF_SECT_STRTAB: Final = 8
DOF_SECT_VARTAB: Final = 9
DOF_SECT_RELTAB: Final = 10
DOF_SECT_TYPTAB: Final = 11
DOF_SECT_URELHDR: Final = 12
DOF_SECT_KRELHDR: Final = 13
DOF_SECT_OPTDESC: Final = 14
DOF_SECT_PROVIDER: Final = 15
DOF_SECT_PROBES: Final = 16
DOF_SECT_PRARGS: Final = 17
DOF_SECT_PROFFS: Final = 18
DOF_SECT_INTTAB: Final = 19
DOF_SECT_UTSNAME: Final = 20
DOF_SECT_XLTAB: Final = 21
DOF_SECT_XLMEMBERS: Final = 22
DOF_SECT_XLIMPORT: Final = 23
DOF_SECT_XLEXPORT: Final = 24
DOF_SECT_PREXPORT: Final = 25
DOF_SECT_PRENOFFS: Final = 26

DOF_SECT_NAMES: Final = map_namespace("DOF_SECT_", globals())


#: ``DOF_SEC_ISLOADABLE``: a list of the *known* loadable types (ECBDESC … INTTAB,
#: XLTAB … PRENOFFS).  NONE, COMMENTS, SOURCE, UTSNAME and every type upstream does not
#: know are not loadable, so such a section without DOF_SECF_LOAD is skipped.
_LOADABLE_TYPES: Final = frozenset(
    [*range(DOF_SECT_ECBDESC, DOF_SECT_INTTAB + 1), *range(DOF_SECT_XLTAB, DOF_SECT_PRENOFFS + 1)]
)


def dof_sec_isloadable(sec_type: int) -> bool:
    """``DOF_SEC_ISLOADABLE``: *sec_type* is one of the known loadable section types."""
    return sec_type in _LOADABLE_TYPES


# --- relocation types --------------------------------------------------------
DOF_RELO_NONE: Final = 0
DOF_RELO_SETX: Final = 1

# --- string limits (include/dtrace/universal.h), in bytes including the NUL --
DTRACE_PROVNAMELEN: Final = 64
DTRACE_MODNAMELEN: Final = 64
DTRACE_FUNCNAMELEN: Final = 128
DTRACE_NAMELEN: Final = 64
DTRACE_ARGTYPELEN: Final = 128

# Upstream's cap on one DOF (usdt_parser.h DOF_MAXSZ); loadsz at or above it is refused.
DOF_MAXSZ: Final = 256 * 1024 * 1024

# --- structures ----------------------------------------------------------------
DOF_HDR = Layout(
    "dof_hdr_t",
    (
        ("ident", "16s"),
        ("flags", "I"),
        ("hdrsize", "I"),
        ("secsize", "I"),
        ("secnum", "I"),
        ("secoff", "Q"),
        ("loadsz", "Q"),
        ("filesz", "Q"),
        ("pad", "Q"),
    ),
    size=64,
)

DOF_SEC = Layout(
    "dof_sec_t",
    (
        ("type", "I"),
        ("align", "I"),
        ("flags", "I"),
        ("entsize", "I"),
        ("offset", "Q"),
        ("size", "Q"),
    ),
    size=32,
)

DOF_PROVIDER_V1 = Layout(
    "dof_provider_v1_t",
    (
        ("strtab", "I"),
        ("probes", "I"),
        ("prargs", "I"),
        ("proffs", "I"),
        ("name", "I"),
        ("provattr", "I"),
        ("modattr", "I"),
        ("funcattr", "I"),
        ("nameattr", "I"),
        ("argsattr", "I"),
    ),
    size=40,
)

DOF_PROVIDER = Layout(
    "dof_provider_t",
    (*DOF_PROVIDER_V1.fields, ("prenoffs", "I")),
    size=44,
)

DOF_PROBE = Layout(
    "dof_probe_t",
    (
        ("addr", "Q"),
        ("func", "I"),
        ("name", "I"),
        ("nargv", "I"),
        ("xargv", "I"),
        ("argidx", "I"),
        ("offidx", "I"),
        ("nargc", "B"),
        ("xargc", "B"),
        ("noffs", "H"),
        ("enoffidx", "I"),
        ("nenoffs", "H"),
        ("pad1", "H"),
        ("pad2", "I"),
    ),
    size=48,
)

DOF_RELOHDR = Layout(
    "dof_relohdr_t",
    (("strtab", "I"), ("relsec", "I"), ("tgtsec", "I")),
    size=12,
)

DOF_RELODESC = Layout(
    "dof_relodesc_t",
    (("name", "I"), ("type", "I"), ("offset", "Q"), ("data", "Q")),
    size=24,
)

DOF_HELPER = Layout(
    "dof_helper_t",
    (("mod", "64s"), ("addr", "Q"), ("dof", "Q")),
    size=80,
)
