"""An ADDDOF client whose probes the real dtrace can fire (run by ``test_interop.py``).

``python -m tests.realdtrace.dofclient --device H --code-file F --dof-file D [--anon]``

The registration is ``tests.support.client.Client``'s (``DTRACEHIOC_ADDDOF``; the DOF
file is an object file (:func:`object_file`) whose text is mapped ``PROT_READ|PROT_EXEC``
at ``CODE_ADDR`` and whose DOF follows; ``--anon``: the DOF copied into anonymous memory
and ``dofhp_addr = dofhp_dof``, the text copied into an unlinked file mapped at
``CODE_ADDR``, as libusdt does). What this adds: the text (and ``--code-file``, mapped
there before) holds real machine code (:func:`code_bytes`): one tiny function per
probe, ``nop`` × 16, the probe site (one more ``nop``, at ``+SITE``), ``ret``; ``fire N``
calls them through ctypes with C arguments in the registers the ABI puts them in, so a
uprobe on the site sees them as ``arg0``, ``arg1``, as at a ``dtrace -G`` call site.

Probes (:func:`probes`): provider ``PROVIDER``, ``fn0:start(int, char *)`` at
``CODE_ADDR``, ``fn1:done(int)`` at ``CODE_ADDR + 0x40``. ``fire N`` calls
``fn0(i, "dofclient")`` for i = 0..N-1, then ``fn1(N)``.

Protocol: it prints one JSON line ``{"pid": P, "register": {"gen": G, ...}}`` after
registering, then answers each stdin line: ``fire N`` → ``{"fired": N}``, ``exit``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from tests.support.client import CODE_ADDR, CODE_SIZE, Client, object_bytes

PROVIDER = "rdtdof"
#: Offset of the probe site in each function (dofpr_offs).
SITE = 0x10
FUNCS = [0, 0x40]  # fn0, fn1: offsets in the code file
LABEL = b"dofclient"


def code_bytes() -> bytes:
    """CODE_SIZE bytes: at each offset in FUNCS, ``nop`` × SITE, ``nop`` (the site), ``ret``."""
    code = bytearray(b"\xcc" * CODE_SIZE)  # int3 anywhere else
    for off in FUNCS:
        code[off : off + SITE + 2] = b"\x90" * (SITE + 1) + b"\xc3"
    return bytes(code)


def probes(relocate: bool) -> bytes:
    """The DOF of the two probes (absolute addresses in CODE_ADDR's mapping)."""
    # Translated types as dtrace -G emits them (identity): without them dtrace's args[] is empty.
    start = ["int", "char *"]
    specs = [
        ProbeSpec(
            func="fn0",
            name="start",
            offsets=[SITE],
            addr=CODE_ADDR + FUNCS[0],
            native=start,
            xlat=start,
            argmap=[0, 1],
        ),
        ProbeSpec(
            func="fn1",
            name="done",
            offsets=[SITE],
            addr=CODE_ADDR + FUNCS[1],
            native=["int"],
            xlat=["int"],
            argmap=[0],
        ),
    ]
    return build_dof([ProviderSpec(PROVIDER, specs, relocate=relocate)]).data


def object_file(relocate: bool) -> bytes:
    """What ``--dof-file`` holds: :func:`code_bytes` as the text, then :func:`probes`."""
    return object_bytes(probes(relocate), code_bytes())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", required=True)
    ap.add_argument("--code-file", required=True)
    ap.add_argument("--dof-file", required=True)
    ap.add_argument("--mod", default="dofclient")
    ap.add_argument("--anon", action="store_true")
    args = ap.parse_args()
    client = Client(args.device, args.code_file)
    result = client.register(
        {"dof_file": args.dof_file, "mod": args.mod, "anon": args.anon, "anon_text": "unlinked"}
    )
    fn0 = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p)(client.code_addr + FUNCS[0])
    fn1 = ctypes.CFUNCTYPE(None, ctypes.c_int)(client.code_addr + FUNCS[1])
    print(json.dumps({"pid": os.getpid(), "register": result}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["fire"]:
            n = int(words[1])
            for i in range(n):
                fn0(i, LABEL)
            fn1(n)
            print(json.dumps({"fired": n}), flush=True)
        elif words[:1] == ["exit"]:
            break
        else:
            print(json.dumps({"error": line.strip()}), flush=True)


if __name__ == "__main__":
    main()
