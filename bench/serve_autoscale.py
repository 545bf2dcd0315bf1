"""The query encoder's autoscaling seen from Serve's own status under a step load: a quiet
phase, a burst, quiet again; replica counts over time, plotted.

    python bench/serve_autoscale.py --index runs/indexes/homedepot/vN
        --prepared runs/data/homedepot [--burst 16] [--phases 15 60 60]

The load is wrk (``apt-get install wrk``) at 1 connection, then ``--burst`` connections, then
none; the encoder scales between 1 and ``--max-replicas`` with short up/down delays so that one
run shows both directions. Writes autoscale.json and autoscale.png under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _setup import local_ray
from serve_load import WRK_SCRIPT

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.serving.app import ENCODER, AppArgs
from retrieval_platform.serving.control import app_config, apply, serve_config


def replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[ENCODER]
    return int(status.replica_states.get("RUNNING", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--phases", type=int, nargs=3, default=[15, 60, 60],
                        help="seconds quiet (1 connection), burst, idle")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--out", default="runs/bench/autoscale")
    args = parser.parse_args()
    local_ray()
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    encoder = {"cpus": 0.5, "min_replicas": 1, "max_replicas": args.max_replicas,
               "target_ongoing_requests": 1, "upscale_delay_s": 3, "downscale_delay_s": 15}
    config = app_config(AppArgs(index=args.index, lexical=False, encoder=encoder))
    apply(serve_config([config], port=args.port))
    app = config["name"]
    queries = PreparedDataset(args.prepared).queries()["text"].to_pylist()[:500]
    bodies = ", ".join(json.dumps(json.dumps({"query": q, "k": 10})) for q in queries)
    script = Path(tempfile.mkdtemp()) / "load.lua"
    script.write_text(WRK_SCRIPT % bodies)
    url = f"http://127.0.0.1:{args.port}"

    samples: list[dict[str, float]] = []
    started = time.perf_counter()
    stop = threading.Event()
    level = {"connections": 0}

    def poll() -> None:
        while not stop.is_set():
            samples.append({"t": round(time.perf_counter() - started, 1),
                            "replicas": replicas(app), "connections": level["connections"]})
            time.sleep(1.0)

    poller = threading.Thread(target=poll)
    poller.start()
    quiet, burst, idle = args.phases
    for connections, seconds in ((1, quiet), (args.burst, burst)):
        level["connections"] = connections
        subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
                        "--timeout", "10s", "-s", str(script), url], capture_output=True,
                       check=True)
    level["connections"] = 0
    time.sleep(idle)
    stop.set()
    poller.join()
    serve.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"encoder": encoder, "phases_s": args.phases, "burst": args.burst,
              "samples": samples,
              "max_replicas_seen": max(s["replicas"] for s in samples),
              "replicas_at_end": samples[-1]["replicas"]}
    (out / "autoscale.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s["t"] for s in samples])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.step(t, [s["replicas"] for s in samples], where="post", label="encoder replicas (RUNNING)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("replicas")
    ax2 = ax.twinx()
    ax2.fill_between(t, [s["connections"] for s in samples], step="post", alpha=0.2,
                     color="C1", label="load (connections)")
    ax2.set_ylabel("open connections")
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title("Query encoder autoscaling under a step load (Serve status, 1 s samples)")
    fig.tight_layout()
    fig.savefig(out / "autoscale.png", dpi=110)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
