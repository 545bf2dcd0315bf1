"""Ray workers at nice 15 (Ray's default) against nice 0, alternating, on the HTTP path's floor
(``serve_floor.py``'s ``/hop``: proxy -> ingress -> one handle call, no work): each run a fresh
local Ray started with ``RAY_worker_niceness`` set, one open-loop run at ``--rate``.

    python bench/worker_niceness.py [--pairs 4] [--rate 40] [--path /hop] [--json out.json]

The load generator runs on the same machine, at nice 0: the question is whether the service's
workers lose the CPU to it (and to Ray's own processes, also at 0) at Ray's default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path


def one_run(rate: float, path: str) -> dict:
    """In a child process whose environment carries the nice value: deploy, warm, load."""
    from _load import open_loop
    from ray import serve
    from serve_floor import deploy

    url = deploy(8015)
    asyncio.run(open_loop(url, lambda i: ("POST", path, {"i": i}), 10, 2, grace_s=2))
    result = asyncio.run(open_loop(url, lambda i: ("POST", path, {"i": i}), rate, 8,
                                   grace_s=2)).summary()
    serve.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--path", default="/hop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_run(args.rate, args.path)), flush=True)
        return
    ray_bin = str(Path(sys.executable).with_name("ray"))
    runs = []
    for pair in range(args.pairs):
        for niceness in ("15", "0"):
            subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
            child = subprocess.run(
                [sys.executable, __file__, "--child", "--rate", str(args.rate), "--path",
                 args.path], env=os.environ | {"RAY_worker_niceness": niceness},
                capture_output=True, text=True, timeout=180)
            line = next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))
            runs.append({"pair": pair, "niceness": int(niceness)} | json.loads(line[7:]))
            print(runs[-1], flush=True)
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
    out = {"cpus": os.cpu_count(), "rate": args.rate, "path": args.path, "runs": runs}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
