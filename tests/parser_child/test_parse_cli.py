"""``dtprobed-parse`` as a user runs it: the installed console script, exit codes, exact output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper, many_probes_dof
from common.limits import ParseLimits
from common.records import Err
from parserd.dof_parse import parse_dof
from parserd.sandbox import DEBUG_ENV

SCRIPT = Path(sys.executable).with_name("dtprobed-parse")
CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus"

# Checked by hand against shared/fixtures/README.md: provider feasprov, module feasmod from
# the helper, func1:start(char *, int), func1:done(int, int, char *), func2:event(json); one
# regular tracepoint each at the absolute dofpr_addr + offset; the is-enabled offsets are
# dropped (DOF version 2).
LIBUSDT_JSON = """\
{"type":"provider","name":"feasprov","nprobes":3}
{"type":"probe","mod":"feasmod","fun":"func1","prb":"start","ntp":1,"nargc":2,"xargc":2}
{"type":"args_native","args":["char *","int"]}
{"type":"args_xlat","args":["char *","int"]}
{"type":"args_map","map":[0,1]}
{"type":"tracepoint","addr":140255869874192,"is_enabled":false}
{"type":"probe","mod":"feasmod","fun":"func1","prb":"done","ntp":1,"nargc":3,"xargc":3}
{"type":"args_native","args":["int","int","char *"]}
{"type":"args_xlat","args":["int","int","char *"]}
{"type":"args_map","map":[0,1,2]}
{"type":"tracepoint","addr":140255869870096,"is_enabled":false}
{"type":"probe","mod":"feasmod","fun":"func2","prb":"event","ntp":1,"nargc":1,"xargc":1}
{"type":"args_native","args":["json"]}
{"type":"args_xlat","args":["json"]}
{"type":"args_map","map":[0]}
{"type":"tracepoint","addr":140255869866000,"is_enabled":false}
{"type":"eof"}
"""


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60, env=env,
        check=False,
    )  # fmt: skip


@pytest.fixture
def known_dof(tmp_path: Path) -> Path:
    probe = ProbeSpec(
        "main", "tick", [0x20, 0x10], enoffsets=[0x8], addr=0x401000,
        native=["int", "char *"], xlat=["long"], argmap=[1],
    )  # fmt: skip
    path = tmp_path / "known.dof"
    path.write_bytes(build_dof([ProviderSpec("demo", [probe])]).data)  # version 3 (is-enabled)
    return path


def test_libusdt_fixture_json_exactly() -> None:
    proc = run(CORPUS / "libusdt-3probes.dof", "--helper", CORPUS / "libusdt-3probes.dh", "--json")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == LIBUSDT_JSON


def test_known_dof_json_exactly(known_dof: Path) -> None:
    proc = run(known_dof, "--json")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [
        '{"type":"provider","name":"demo","nprobes":1}',
        '{"type":"probe","mod":"a.out","fun":"main","prb":"tick","ntp":3,"nargc":2,"xargc":1}',
        '{"type":"args_native","args":["int","char *"]}',
        '{"type":"args_xlat","args":["long"]}',
        '{"type":"args_map","map":[1]}',
        '{"type":"tracepoint","addr":4198416,"is_enabled":false}',
        '{"type":"tracepoint","addr":4198432,"is_enabled":false}',
        '{"type":"tracepoint","addr":4198408,"is_enabled":true}',
        '{"type":"eof"}',
    ]


def test_known_dof_text_one_line_per_record(known_dof: Path) -> None:
    proc = run(known_dof)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "provider demo nprobes=1",
        "  probe a.out:main:tick ntp=3 nargc=2 xargc=1",
        "    args_native (int, char *)",
        "    args_xlat (long)",
        "    args_map [1]",
        "    tracepoint 0x401010",
        "    tracepoint 0x401020",
        "    tracepoint 0x401008 is-enabled",
        "eof",
    ]


def test_rejected_dof_prints_exactly_one_err_line_and_exits_1(
    tmp_path: Path, known_dof: Path
) -> None:
    bad = bytearray(known_dof.read_bytes())
    bad[4] = 9  # data model
    path = tmp_path / "bad.dof"
    path.write_bytes(bytes(bad))
    (err,) = parse_dof(build_helper(), bytes(bad))
    assert isinstance(err, Err)
    proc = run(path, "--json")
    assert proc.returncode == 1
    assert proc.stdout == (f'{{"type":"err","errno":{err.errno},"message":"{err.message}"}}\n')


def test_size_limit_gives_the_parsers_e2big_line(known_dof: Path) -> None:
    size = known_dof.stat().st_size
    (err,) = parse_dof(build_helper(), known_dof.read_bytes(), ParseLimits(max_dof_size=64))
    proc = run(known_dof, "--json", "--max-dof-size", "64")
    assert proc.returncode == 1
    assert (
        proc.stdout
        == f'{{"type":"err","errno":7,"message":"data size {size} exceeds maximum 64"}}\n'
    )
    assert isinstance(err, Err) and (err.errno, err.message) == (
        7,
        f"data size {size} exceeds maximum 64",
    )


def test_helper_module_and_no_sandbox(tmp_path: Path, known_dof: Path) -> None:
    helper = tmp_path / "dh"
    helper.write_bytes(build_helper("libdemo.so.1", 0x10000))
    proc = run(known_dof, "--helper", helper, "--json", "--no-sandbox", "-t", "20")
    assert proc.returncode == 0
    assert '"mod":"libdemo.so.1"' in proc.stdout and '"addr":4198416,' in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["/nonexistent/x.dof"],
        ["{dof}", "--helper", "{dof}"],  # not 80 bytes
        ["{dof}", "--max-probes", "0"],
        ["{dof}", "-t", "0"],
        ["{dof}", "--max-dof-size", "10"],  # below ParseLimits' minimum of 64
        ["{dof}", "--bogus"],
    ],
)
def test_usage_errors_exit_2(known_dof: Path, args: list[str]) -> None:
    proc = run(*(a.format(dof=known_dof) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "dtprobed-parse" in proc.stderr


def test_child_failure_exits_3_with_a_message(known_dof: Path) -> None:
    # an invalid debug switch makes the child refuse to lock itself, so it exits before answering
    proc = run(known_dof, "--json", env=dict(os.environ, **{DEBUG_ENV: "bogus"}))
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert "closed its pipe in the middle of a request; it exited with status 1" in proc.stderr


def test_reader_going_away_ends_quietly_with_the_verdict(tmp_path: Path) -> None:
    """`dtprobed-parse --json big.dof | head -1`: no traceback, exit status still the verdict."""
    big = tmp_path / "big.dof"
    big.write_bytes(many_probes_dof(2000).data)  # ~6000 lines, far more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtprobed.cli.parse", "--json", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    stderr = proc.stderr.read()
    assert proc.wait(60) == 0
    assert first.startswith(b'{"type":"provider"')
    assert stderr == b""


NOTES = Path(__file__).resolve().parents[1] / "parser" / "fixtures" / "notes"


@pytest.mark.parametrize(("name", "base"), [("libfx.so", 0x7F00_0000_0000), ("fx_isenabled", 0)])
def test_elf_object_prints_what_a_hasusdt_registration_parses(name: str, base: int) -> None:
    """--elf runs the two exchanges a registration runs: the records are the pure
    parser's for the blocks it locates, with the load base and the file's basename."""
    import json

    from common.dof_abi import DOF_HELPER
    from common.records import NotesLocation
    from parserd.elf_notes import locate_notes, parse_note_blocks

    path = NOTES / name
    data = path.read_bytes()
    helper = DOF_HELPER.pack(name.encode().ljust(64, b"\0"), base, 0)
    [where] = locate_notes(helper, len(data), lambda o, n: data[o : o + n], ParseLimits())
    assert isinstance(where, NotesLocation)
    notes = data[where.notes_offset : where.notes_offset + where.notes_size]
    rodata = data[where.rodata_offset : where.rodata_offset + where.rodata_size]
    helper = DOF_HELPER.pack(name.encode().ljust(64, b"\0"), where.base, 0)
    expected = parse_note_blocks(
        helper, where.notes_addr, notes, where.rodata_addr, rodata, ParseLimits()
    )
    proc = run("--elf", path, "--base", hex(base), "--json")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(expected) and lines[-1] == {"type": "eof"}
    probes = [ln for ln in lines if ln["type"] == "probe"]
    assert probes and all(p["mod"] == name for p in probes)
    tracepoints = [ln for ln in lines if ln["type"] == "tracepoint"]
    wanted = [r for r in expected if type(r).__name__ == "Tracepoint"]
    assert [(t["addr"], t["is_enabled"], t["args"]) for t in tracepoints] == [
        (r.addr, r.is_enabled, r.args)
        for r in wanted  # type: ignore[union-attr]
    ]
    if name == "fx_isenabled":  # ET_EXEC: link-time addresses, whatever --base says
        assert all(0x400000 <= t["addr"] < 0x500000 for t in tracepoints)
    else:
        assert all(base < t["addr"] < base + len(data) for t in tracepoints)


def test_elf_refusals_and_usage() -> None:
    no_notes = run("--elf", sys.executable, "--json")
    assert no_notes.returncode == 1
    [line] = no_notes.stdout.splitlines()
    assert line.startswith('{"type":"err","errno":22,"message":"no .note.usdt section in ')
    assert run("--elf", NOTES / "libfx.so", "--helper", NOTES / "libfx.so").returncode == 2
    assert run(NOTES / "libfx.so", "--base", "0x1000").returncode == 2
    assert run("--elf", "/nonexistent/object").returncode == 2
