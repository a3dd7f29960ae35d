"""A small helper-device server process for the device tests.

``python -m tests.device.server PATH [--host-ns-pid PID] [--result N]``:
opens the FUSE-file device on PATH with a handler that records each request
(one JSON line on stdout: tid, kind, gen, helper hex, DOF length) and replies
``--result``.  Prints ``{"ready": true}`` once serving; SIGTERM closes the
device (unmounting it) and exits 0.  Used to run the device in another mount
namespace (under ``unshare -m``) and to leave a stale mount (SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from types import FrameType

from dtprobed.device.opener import open_device
from dtprobed.device.request import HelperRequest, Reply


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--host-ns-pid", type=int, default=1)
    ap.add_argument("--result", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)

    def handler(req: HelperRequest, reply: Reply) -> None:
        line = {
            "tid": req.tid,
            "kind": req.kind,
            "gen": req.gen,
            "helper": req.helper.hex(),
            "dof_len": len(req.dof),
            "remote": req.remote,
        }
        print(json.dumps(line), flush=True)
        reply(args.result)

    dev = open_device(
        "fuse", args.path, handler, max_dof_size=1 << 20, host_ns_pid=args.host_ns_pid
    )
    try:
        print(json.dumps({"ready": True, "mode": dev.mode}), flush=True)
        dev.run(stop, poll_interval=0.05)
    finally:
        dev.close()


if __name__ == "__main__":
    main()
