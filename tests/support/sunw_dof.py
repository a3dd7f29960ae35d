"""Objects with a ``.SUNW_dof`` section, built the way ``dtrace -G`` <= 2.0.2 built them.

dtrace 2.0.3 and later emit ``.note.usdt`` notes instead, and there is no older dtrace to
build DOF-carrying programs with; so this module makes them from scratch, with the host's
gcc and binutils (no chroot):

* a generated C file (``probes.c``) holds one ``noinline`` function per probe; each probe
  site is an ``asm volatile`` block, a five-``nop`` sequence (the size of the ``call
  __dtrace_prov___probe`` that old ``dtrace -G`` overwrote with nops) starting at a hidden
  global label, with the probe's arguments in the System V argument registers (``rdi``,
  ``rsi``, ``rdx``, ``rcx``, ``r8``, ``r9``), where the tracer reads them; an is-enabled
  site (in a function of its own, ``FUNC_enabled``) passes the address of an ``int`` the
  tracer sets to 1, in ``rdi``, as dtrace 2.0's DOF v3 is-enabled probes do;
* the DOF comes from :func:`common.dof_build.build_dof` with SETX relocations
  (``relocate=True``): ``dofpr_addr`` is the function's link-time address, i.e. relative
  to the load base for ET_DYN (absolute for ET_EXEC, whose ``dofhp_addr`` is 0), and the
  offsets are relative to the function's start, as ``dtrace -G`` laid them out;
* ``dof.S`` puts it in ``.section .SUNW_dof,"a",@progbits`` (``.incbin``), 8-aligned, with
  the hidden symbol ``__SUNW_dof`` at its start: allocated, read-only, in a LOAD segment;
* ``sunw_src/drti_sunw.c``, a constructor modelled on old drti, registers it with
  ``DTRACEHIOC_ADDDOF``: ``dofhp_mod`` = the object's basename, ``dofhp_addr`` = load base
  for ET_DYN (0 for ET_EXEC), ``dofhp_dof`` = the section's run-time address;
* two link passes: the first with a placeholder DOF of the final size, ``nm`` then gives
  the function and site addresses, the second links the real DOF; the builder checks that
  no symbol moved and that the section's bytes in the file are the DOF.

Kinds: ``exe`` (non-PIE, ET_EXEC), ``pie`` (ET_DYN), ``lib`` (a shared library for
``dlopen``; drive it with an executable, e.g. one built with ``providers=[]``). Executables
get ``sunw_src/driver.c``'s ``main``: commands on stdin (fire probe P N times, is-enabled,
registration state, dlopen/dlclose, fork, exit), driven from Python by
:class:`SunwProgram`. Builds are cached by content hash under ``/var/cache/dtprobed-py/sunw``
(env ``DTPROBED_SUNW_CACHE``). More (what the objects look like, usage): ``sunw_src/README.md``.

The DOF's version is :func:`~common.dof_build.build_dof`'s default, as ``dtrace -G`` chose:
2, or 3 when a provider has is-enabled probes (upstream's parser ignores is-enabled offsets
in v2 DOF).

Argument values: in the *i*-th firing (from 0), an integer argument *k* is ``i * 1000 +
k`` and a ``char *`` argument is the probe's name (:meth:`BuiltObject.arg_values`).

What old drti did that ``drti_sunw.c`` does not: the ``LM<lmid>`\\ `` module prefix for
objects loaded outside the base link map (``dlmopen``; ours assumes lmid 0), the Solaris
fallback device ``/devices/pseudo/dtrace@0:helper``, and the ELF relocation machinery of
``dtrace -G`` itself (it wrote ``R_X86_64_64`` relocations against the functions into the
object file, so the runtime loader might already have relocated ``dofpr_addr``; here the
DOF holds link-time addresses and the daemon's parser adds ``dofhp_addr``, which the
parser's "already relocated?" rule handles either way). Old drti found its object with
``dlinfo(RTLD_SELF)``/``/proc/self/maps``; ours uses ``/proc/self/maps`` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper

HERE = Path(__file__).resolve().parent
SRC = HERE / "sunw_src"
DEFAULT_CACHE = "/var/cache/dtprobed-py/sunw"
#: Bump when the generated code changes in a way the hash of the inputs does not see.
RECIPE = "1"
KINDS = ("exe", "pie", "lib")
ET_EXEC, ET_DYN = 2, 3
#: Argument registers of the System V x86_64 ABI, in order.
ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
INT_TYPES = frozenset(
    {
        "int", "unsigned int", "long", "unsigned long", "long long", "unsigned long long",
        "int32_t", "uint32_t", "int64_t", "uint64_t", "uintptr_t", "size_t",
    }
)  # fmt: skip
STRING_TYPES = frozenset({"char *", "const char *"})
#: The site: five nops, the length of the call that old dtrace -G overwrote.
SITE_NOPS = 5


class BuildError(RuntimeError):
    """The toolchain failed or produced something unexpected; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class SunwProbe:
    """One probe: ``sites`` regular sites in ``func`` and optionally one is-enabled site.

    ``func`` defaults to ``PROVIDER_PROBE`` (non-identifier characters as ``_``); the
    is-enabled site is in ``FUNC_enabled``.
    """

    name: str
    args: tuple[str, ...] = ()
    sites: int = 1
    is_enabled: bool = False
    func: str | None = None


@dataclass(frozen=True)
class SunwProvider:
    name: str
    probes: tuple[SunwProbe, ...]


@dataclass(frozen=True)
class Site:
    """One tracepoint: where it is in the object (link-time addresses)."""

    index: int  # probe index (over all providers, in order): the driver's P
    provider: str
    probe: str
    func: str
    func_addr: int
    addr: int  # the site's label (the first of its nops)
    is_enabled: bool


@dataclass(frozen=True)
class Section:
    name: str
    addr: int
    offset: int
    size: int
    flags: str
    align: int


@dataclass(frozen=True)
class BuiltObject:
    path: Path
    kind: str
    providers: tuple[SunwProvider, ...]
    elf_type: int  # ET_EXEC or ET_DYN
    dof_section: Section | None  # .SUNW_dof (None without providers)
    sites: tuple[Site, ...]
    funcs: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dof(self) -> bytes:
        """The bytes of ``.SUNW_dof`` in the file."""
        sec = self.dof_section
        if sec is None:
            return b""
        with self.path.open("rb") as f:
            f.seek(sec.offset)
            return f.read(sec.size)

    def relocated(self, addr: int, base: int) -> int:
        """A link-time address at run time (``base``: start of the object's first mapping)."""
        return addr + base if self.elf_type == ET_DYN else addr

    def helper(self, base: int) -> bytes:
        """The ``dof_helper_t`` the constructor sends when the object is loaded at ``base``."""
        assert self.dof_section is not None
        return build_helper(
            self.name.encode(),
            base if self.elf_type == ET_DYN else 0,
            self.relocated(self.dof_section.addr, base),
        )

    def probe(self, index: int) -> tuple[SunwProvider, SunwProbe]:
        return _flat(self.providers)[index]

    def arg_values(self, index: int, i: int) -> list[int | str]:
        """The arguments of probe ``index``'s ``i``-th firing (see the module docstring)."""
        _, probe = self.probe(index)
        return [probe.name if t in STRING_TYPES else i * 1000 + k for k, t in enumerate(probe.args)]


def _flat(providers: Sequence[SunwProvider]) -> list[tuple[SunwProvider, SunwProbe]]:
    return [(pv, pr) for pv in providers for pr in pv.probes]


def _ident(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s)


def func_name(provider: SunwProvider, probe: SunwProbe) -> str:
    return probe.func or f"{_ident(provider.name)}_{_ident(probe.name)}"


# ----------------------------------------------------------------------- code generation


def _site_label(index: int, site: int | str) -> str:
    return f"__sunw_site_{index}_{site}"


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _asm_site(label: str, regs: Sequence[str]) -> str:
    """One site: register variables bound to the argument registers, then the nops."""
    operands = ", ".join(f'"r"(__a{k})' for k in range(len(regs)))
    nops = "\\n\\tnop" * SITE_NOPS
    asm = f'".globl {label}\\n\\t.hidden {label}\\n{label}:{nops}\\n"'
    return f'__asm__ __volatile__({asm} : : {operands} : "memory");'


def generate_probes_c(providers: Sequence[SunwProvider], prefix: str, visibility: str) -> str:
    """``probes.c``: the probe functions and the dispatchers ``PREFIX_fire/_enabled/_info``."""
    out = [
        "/* Generated by tests/support/sunw_dof.py: probe sites for a .SUNW_dof object. */",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "#include <stdio.h>",
        "",
        '#define SUNW_FN __attribute__((noinline, noclone, used, visibility("hidden")))',
        f'#define SUNW_API __attribute__((visibility("{visibility}")))',
    ]
    if providers:
        out.append("void sunw_drti_state(char *buf, size_t len);")
    fire_cases: list[str] = []
    enabled_cases: list[str] = []
    for index, (pv, pr) in enumerate(_flat(providers)):
        if len(pr.args) > len(ARG_REGS):
            raise ValueError(f"{pv.name}:{pr.name}: at most {len(ARG_REGS)} arguments")
        if pr.sites < 0 or pr.sites + int(pr.is_enabled) == 0:
            raise ValueError(f"{pv.name}:{pr.name}: needs a site")
        fn = func_name(pv, pr)
        body: list[str] = []
        for s in range(pr.sites):
            body.append("\t{")
            for k, t in enumerate(pr.args):
                if t in STRING_TYPES:
                    value = f"(long)(uintptr_t){_c_string(pr.name)}"
                elif t in INT_TYPES:
                    value = f"(long)({t})(i * 1000 + {k})"
                else:
                    raise ValueError(f"{pv.name}:{pr.name}: unsupported argument type {t!r}")
                body.append(f'\t\tregister long __a{k} __asm__("{ARG_REGS[k]}") = {value};')
            body.append("\t\t" + _asm_site(_site_label(index, s), ARG_REGS[: len(pr.args)]))
            body.append("\t}")
        out += [
            "",
            f"/* probe {index}: {pv.name}:::{pr.name} ({', '.join(pr.args)}) */",
            f"SUNW_FN void {fn}(long i)",
            "{",
            *(body or ["\t(void)i;"]),
            "}",
        ]
        fire_cases.append(f"\tcase {index}:\n\t\tfor (long i = 0; i < n; i++)\n\t\t\t{fn}(i);")
        fire_cases.append("\t\treturn n;")
        if pr.is_enabled:
            out += [
                f"SUNW_FN int {fn}_enabled(void)",
                "{",
                "\tvolatile int flag = 0;",
                "\t{",
                '\t\tregister long __a0 __asm__("rdi") = (long)(uintptr_t)&flag;',
                "\t\t" + _asm_site(_site_label(index, "e"), ARG_REGS[:1]),
                "\t}",
                "\treturn flag != 0;",
                "}",
            ]
            enabled_cases.append(f"\tcase {index}:\n\t\treturn {fn}_enabled();")
    out += [
        "",
        f"SUNW_API int {prefix}_fire(int probe, int n)",
        "{",
        "\tswitch (probe) {",
        *fire_cases,
        "\tdefault:\n\t\treturn -1;\n\t}",
        "}",
        "",
        f"SUNW_API int {prefix}_enabled(int probe)",
        "{",
        "\tswitch (probe) {",
        *enabled_cases,
        "\tdefault:\n\t\treturn -1;\n\t}",
        "}",
        "",
        f"SUNW_API void {prefix}_info(char *buf, size_t len)",
        "{",
        "\tsunw_drti_state(buf, len);" if providers else '\tsnprintf(buf, len, "none");',
        "}",
        "",
    ]
    return "\n".join(out)


DOF_S = """\
/* Generated by tests/support/sunw_dof.py: the DOF, where dtrace -G <= 2.0.2 put it. */
\t.section .SUNW_dof,"a",@progbits
\t.balign 8
\t.globl __SUNW_dof
\t.hidden __SUNW_dof
\t.type __SUNW_dof, @object
__SUNW_dof:
\t.incbin "dof.bin"
\t.size __SUNW_dof, . - __SUNW_dof
\t.section .note.GNU-stack,"",@progbits
"""


def provider_specs(
    providers: Sequence[SunwProvider], symbols: dict[str, int] | None
) -> list[ProviderSpec]:
    """The DOF's providers; ``symbols`` None gives the placeholder (same size, zeros)."""

    def sym(name: str) -> int:
        return 0 if symbols is None else symbols[name]

    specs: list[ProviderSpec] = []
    index = 0
    for pv in providers:
        probes: list[ProbeSpec] = []
        for pr in pv.probes:
            fn = func_name(pv, pr)
            args = list(pr.args)
            argmap = list(range(len(args)))
            entries: list[tuple[str, list[int], list[int]]] = []  # (func, offsets, enoffsets)
            if pr.sites:
                base = sym(fn)
                entries.append(
                    (fn, [sym(_site_label(index, s)) - base for s in range(pr.sites)], [])
                )
            if pr.is_enabled:
                efn = f"{fn}_enabled"
                entries.append((efn, [], [sym(_site_label(index, "e")) - sym(efn)]))
            for func, offsets, enoffsets in entries:
                probes.append(
                    ProbeSpec(
                        func, pr.name, offsets, enoffsets, addr=sym(func),
                        native=list(args), xlat=list(args), argmap=list(argmap),
                    )
                )  # fmt: skip
            index += 1
        specs.append(ProviderSpec(pv.name, probes, relocate=True))
    return specs


# ------------------------------------------------------------------------- inspection


def nm_symbols(path: Path) -> dict[str, int]:
    """Symbol → value, from ``nm`` (defined symbols only)."""
    proc = _run(["nm", "--defined-only", str(path)])
    out: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[2]] = int(parts[0], 16)
    return out


_SECTION = re.compile(
    r"^\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+"
    r"([A-Za-z]*)\s+\d+\s+\d+\s+(\d+)\s*$"
)


def sections(path: Path) -> dict[str, Section]:
    """Section headers, from ``readelf -SW``."""
    out: dict[str, Section] = {}
    for line in _run(["readelf", "-SW", str(path)]).stdout.splitlines():
        m = _SECTION.match(line)
        if m:
            name, addr, off, size, flags, align = m.groups()
            out[name] = Section(name, int(addr, 16), int(off, 16), int(size, 16), flags, int(align))
    return out


def elf_type(path: Path) -> int:
    with path.open("rb") as f:
        head = f.read(18)
    if head[:4] != b"\x7fELF":
        raise BuildError(f"{path} is not ELF")
    return int.from_bytes(head[16:18], "little")


@dataclass(frozen=True)
class Segment:
    """One LOAD program header."""

    offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: str  # readelf's, e.g. "R", "R E", "RW"

    def holds(self, addr: int, size: int = 1) -> bool:
        return self.vaddr <= addr and addr + size <= self.vaddr + self.memsz


def load_segments(path: Path) -> list[Segment]:
    """LOAD program headers, from ``readelf -lW``."""
    out: list[Segment] = []
    for line in _run(["readelf", "-lW", str(path)]).stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            # LOAD Offset VirtAddr PhysAddr FileSiz MemSiz Flg... Align
            offset, vaddr, filesz, memsz = (int(x, 16) for x in (*parts[1:3], *parts[4:6]))
            out.append(Segment(offset, vaddr, filesz, memsz, " ".join(parts[6:-1])))
    return out


def file_bytes_at(path: Path, vaddr: int, size: int) -> bytes:
    """The file's bytes that a LOAD segment maps at link-time address ``vaddr``."""
    for seg in load_segments(path):
        if seg.holds(vaddr, size) and vaddr + size <= seg.vaddr + seg.filesz:
            with path.open("rb") as f:
                f.seek(seg.offset + vaddr - seg.vaddr)
                return f.read(size)
    raise LookupError(f"{path}: no LOAD segment holds {vaddr:#x}+{size}")


def load_base(pid: int, path: Path) -> int:
    """Start of the first mapping of ``path`` in process ``pid`` (the ET_DYN load base)."""
    target = str(path)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                return int(parts[0].split("-")[0], 16)
    raise LookupError(f"{path} is not mapped in process {pid}")


def read_memory(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(size)


# ---------------------------------------------------------------------------- building


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)
    except FileNotFoundError as exc:
        raise BuildError(f"{argv[0]} is not installed (needed to build .SUNW_dof objects)") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["(no output)"]
        raise BuildError(f"{' '.join(argv[:2])} failed: {lines[0]}")
    return proc


def _compile_argv(kind: str, out: str, with_dof: bool) -> list[str]:
    flags = {
        "exe": ["-fno-pie", "-no-pie"],
        "pie": ["-fPIE", "-pie"],
        "lib": ["-fPIC", "-shared"],
    }[kind]
    srcs = [] if kind == "lib" else ["driver.c"]
    srcs.append("probes.c")
    if with_dof:
        srcs += ["drti_sunw.c", "dof.S"]
    return ["gcc", "-O1", "-g0", "-Wall", *flags, "-o", out, *srcs, "-ldl", "-pthread"]


def _tool_versions() -> str:
    return "\n".join(
        _run([tool, "--version"]).stdout.splitlines()[0] for tool in ("gcc", "ld", "as")
    )


def cache_dir() -> Path:
    return Path(os.environ.get("DTPROBED_SUNW_CACHE", DEFAULT_CACHE))


def _default_name(kind: str) -> str:
    return {"exe": "sunwexe", "pie": "sunwpie", "lib": "libsunw.so"}[kind]


def build_sunw_object(
    providers: Sequence[SunwProvider],
    *,
    kind: str = "pie",
    name: str | None = None,
    cache: Path | None = None,
) -> BuiltObject:
    """Build (or find in the cache) one object; see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    name = name or _default_name(kind)
    if "/" in name or not name:
        raise ValueError(f"bad object name {name!r}")
    providers = tuple(providers)
    prefix = "sunw_lib" if kind == "lib" else "sunw_self"
    probes_c = generate_probes_c(providers, prefix, "default" if kind == "lib" else "hidden")
    h = hashlib.sha256()
    for part in (
        RECIPE,
        kind,
        name,
        json.dumps([asdict(p) for p in providers], sort_keys=True),
        probes_c,
        DOF_S,
        (SRC / "drti_sunw.c").read_text(),
        (SRC / "driver.c").read_text(),
        Path(__file__).read_text(),
        _tool_versions(),
    ):
        h.update(part.encode() + b"\0")
    digest = h.hexdigest()[:16]
    root = cache or cache_dir()
    final = root / digest
    if not (final / ".built").exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (final / ".built").exists():
                _build(final, kind, name, providers, probes_c)
    return _load(final, kind, name, providers)


def build_or_fail(providers: Sequence[SunwProvider], kind: str, name: str) -> BuiltObject:
    """:func:`build_sunw_object` for a test: a build that fails fails the test, plainly."""
    try:
        return build_sunw_object(providers, kind=kind, name=name)
    except BuildError as err:
        pytest.fail(str(err), pytrace=False)


def _build(
    final: Path, kind: str, name: str, providers: tuple[SunwProvider, ...], probes_c: str
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        (tmp / "probes.c").write_text(probes_c)
        shutil.copy(SRC / "driver.c", tmp / "driver.c")
        with_dof = bool(providers)
        if with_dof:
            shutil.copy(SRC / "drti_sunw.c", tmp / "drti_sunw.c")
            (tmp / "dof.S").write_text(DOF_S)
            placeholder = build_dof(provider_specs(providers, None)).data
            (tmp / "dof.bin").write_bytes(placeholder)
        argv = _compile_argv(kind, name, with_dof)
        _run(argv, cwd=tmp)  # pass 1
        if with_dof:
            first = nm_symbols(tmp / name)
            dof = build_dof(provider_specs(providers, first)).data
            if len(dof) != len(placeholder):
                raise BuildError("the DOF changed size between the link passes")
            (tmp / "dof.bin").write_bytes(dof)
            _run(argv, cwd=tmp)  # pass 2: same layout, the real DOF
            second = nm_symbols(tmp / name)
            moved = sorted(k for k in first if second.get(k) != first[k])
            if moved:
                raise BuildError(f"symbols moved between the link passes: {moved[:5]}")
            sec = sections(tmp / name).get(".SUNW_dof")
            if sec is None or sec.size != len(dof) or "A" not in sec.flags:
                raise BuildError(f"{name}: no allocated .SUNW_dof of {len(dof)} bytes: {sec}")
            if second.get("__SUNW_dof") != sec.addr:
                raise BuildError(f"{name}: __SUNW_dof is not at the start of .SUNW_dof")
            with (tmp / name).open("rb") as f:
                f.seek(sec.offset)
                if f.read(sec.size) != dof:
                    raise BuildError(f"{name}: .SUNW_dof's bytes are not the DOF")
        (tmp / ".built").touch()
        tmp.chmod(0o755)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _load(final: Path, kind: str, name: str, providers: tuple[SunwProvider, ...]) -> BuiltObject:
    path = final / name
    symbols = nm_symbols(path)
    sites: list[Site] = []
    for index, (pv, pr) in enumerate(_flat(providers)):
        fn = func_name(pv, pr)
        for s in range(pr.sites):
            addr = symbols[_site_label(index, s)]
            sites.append(Site(index, pv.name, pr.name, fn, symbols[fn], addr, False))
        if pr.is_enabled:
            addr = symbols[_site_label(index, "e")]
            efn = f"{fn}_enabled"
            sites.append(Site(index, pv.name, pr.name, efn, symbols[efn], addr, True))
    funcs = {s.func: s.func_addr for s in sites}
    return BuiltObject(
        path,
        kind,
        providers,
        elf_type(path),
        sections(path).get(".SUNW_dof") if providers else None,
        tuple(sites),
        funcs,
    )


# ---------------------------------------------------------------------------- driving


class SunwProgram:
    """A running executable built here, driven by one-line commands (``driver.c``)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._buf = bytearray()
        self._pending: list[str] = []

    @classmethod
    def start(
        cls,
        exe: Path,
        *,
        devname: str | os.PathLike[str] | None,
        env: dict[str, str] | None = None,
        debug: bool = True,
        cpus: set[int] | None = None,
        timeout: float = 30.0,
    ) -> SunwProgram:
        """Start ``exe`` on the host with a clean environment; wait for "PID ready".

        ``devname``: ``DTRACE_DOF_INIT_DEVNAME`` (None: the constructor's default helper).
        ``debug``: set ``DTRACE_DOF_INIT_DEBUG`` (the constructor's messages on stderr).
        ``cpus``: pin the program (and its fork children) to these CPUs. dtrace keeps one
        buffer per CPU and prints them CPU by CPU, so the order of its output lines is the
        order of the firings only when they all ran on one CPU.
        """
        full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
        if devname is not None:
            full["DTRACE_DOF_INIT_DEVNAME"] = os.fspath(devname)
        if debug:
            full["DTRACE_DOF_INIT_DEBUG"] = "1"
        full.update(env or {})
        proc = subprocess.Popen(
            [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full,
        )
        prog = cls(proc)
        try:
            if cpus is not None:
                os.sched_setaffinity(proc.pid, cpus)  # before any command: no probe fired yet
            line = prog.read_line(timeout)
        except BaseException:
            prog.kill()
            raise
        if line != f"{proc.pid} ready":
            prog.kill()
            raise BuildError(f"{exe.name} did not start: {line!r}")
        return prog

    def read_line(self, timeout: float = 30.0) -> str:
        if self._pending:
            return self._pending.pop(0)
        return self._read_new_line(timeout)

    def _read_new_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"program {self.pid} said nothing within {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"program {self.pid} closed its output (exit {self.proc.poll()})")
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode(errors="replace")

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The first line (kept from earlier, or new) starting with ``prefix``."""
        for i, line in enumerate(self._pending):
            if line.startswith(prefix):
                del self._pending[i]
                return line
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_new_line(max(0.1, deadline - time.monotonic()))
            if line.startswith(f"{self.pid} error"):
                raise RuntimeError(f"program {self.pid}: {line}")
            if line.startswith(prefix):
                return line
            self._pending.append(line)

    def command(self, cmd: str, timeout: float = 30.0) -> str:
        """Send one command; the parent's answer after "PID ok "."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.expect(f"{self.pid} ", timeout)
        prefix = f"{self.pid} ok "
        if not line.startswith(prefix):
            raise RuntimeError(f"program {self.pid}: {line}")
        return line[len(prefix) :]

    def info(self, cmd: str = "i") -> dict[str, str]:
        """The constructor's state (``i``, or ``li`` for the library) as a dict."""
        answer = self.command(cmd).split()[1:]
        return dict(kv.split("=", 1) for kv in answer)

    def quit(self, timeout: float = 30.0) -> tuple[int, str]:
        """Send "q"; return (exit status, stderr)."""
        try:
            _, err = self.proc.communicate(input=b"q\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.proc.returncode, err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=30)
