"""Serving under open-loop, constant-rate load (#27): per mode (dense, hybrid, lexical), p50 /
p99 / errors at fixed offered rates and the highest rate of a ladder whose p99 stays within a
bound, for index variants deployed in turn in one run.

    python bench/serve_open_loop.py [--products 5000] [--rates 50 100 150]
        [--ladder 5 10 15 20 30 40 50 65 80 100] [--duration 8] [--grace 2] [--p99-bound-ms 100]
        [--modes dense hybrid lexical]
        [--variants '{"NAME": {"build": {...}, "app": {...}, "index": FOLDER}, ...}']
        [--prepared runs/data/homedepot] [--json out.json] [--direct-ingress]

Requests go out at scheduled times whatever the answers do (``_load.open_loop``), and each
latency counts from its scheduled send time, so a queue shows up in p99 instead of slowing the
sender (no coordinated omission). The generator runs on the same machine as the service (it
takes CPU from it: say so beside the numbers). Loopback only. Every run is bounded (arrivals
for ``duration`` seconds, ``grace`` seconds more for answers, then the rest is cut and counted
unanswered), rates climb in ascending order, and each run starts on an idle service (``drain``),
so an overloaded run cannot poison the next one.

``--direct-ingress`` sends the load to the ingress replica's own HTTP server instead of Serve's
proxy (one hop less): Ray's throughput-optimised mode, which has to be on in the environment
Ray starts in (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``); the replica listens on
``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` (30000). ``bench/serve_floor.py`` measures what the
proxy costs with no search at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
from _load import open_loop
from _setup import direct_ingress_url, local_ray, synthetic_catalog

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import from_dict
from retrieval_platform.index.build import BuildIndexConfig, build_version
from retrieval_platform.serving.app import AppArgs
from retrieval_platform.serving.control import app_config, apply, serve_config

MODES = ("dense", "hybrid", "lexical")
def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


HNSW = {"factory": "HNSW32", "ef_search": 128}
TORCH = {"encoder": {"runtime": "torch", "precision": "fp32"}}
ONNX_INT8 = {"encoder": {"runtime": "onnx", "precision": "int8"}}
DEFAULT_VARIANTS = {  # one lever a step: the shards' index, the encoder's runtime, its threads
    "before: flat x2, torch fp32": {"build": {"num_shards": 2}, "app": TORCH},
    "hnsw x1, torch fp32": {"build": {"num_shards": "auto", "params": HNSW}, "app": TORCH},
    "hnsw x1, onnx int8": {"build": {"num_shards": "auto", "params": HNSW}, "app": ONNX_INT8},
    "hnsw x1, onnx int8, 2 threads": {"build": {"num_shards": "auto", "params": HNSW},
                                      "app": merged(ONNX_INT8, {"encoder": {"threads": 2}})},
}


def run_rate(url: str, queries: list[str], mode: str, rate: float, args: argparse.Namespace,
             duration: float | None = None) -> dict[str, float]:
    """One bounded run: arrivals for ``duration`` seconds, then ``grace`` seconds for the
    last answers; whatever is still open is cancelled and counted as unanswered."""
    def request(i: int) -> tuple[str, str, dict]:
        return "POST", "/search", {"query": queries[i % len(queries)], "k": args.k, "mode": mode}

    return asyncio.run(open_loop(url, request, rate, duration or args.duration,
                                 grace_s=args.grace)).summary()


def idle_latency_ms(url: str, mode: str) -> float:
    """The median of a few requests one at a time: what an idle service answers in."""
    with httpx.Client(base_url=url, timeout=30) as client:
        times = []
        for i in range(7):
            lap = time.perf_counter()
            client.post("/search", json={"query": f"drain probe {i}", "k": 10, "mode": mode})
            times.append((time.perf_counter() - lap) * 1000)
    return float(np.median(times))


def idle_stages(url: str, queries: list[str], mode: str, n: int = 30) -> dict[str, float]:
    """Requests one at a time: the client's median latency and the median of each stage the
    ingress times (``timings_ms``: encode, shards, merge, lexical, total); client minus total
    is the proxy and HTTP path."""
    client_ms: list[float] = []
    stages: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for query in queries[:n]:
            lap = time.perf_counter()
            answer = client.post("/search", json={"query": query, "k": 10, "mode": mode})
            client_ms.append((time.perf_counter() - lap) * 1000)
            for stage, ms in answer.json()["timings_ms"].items():
                stages.setdefault(stage, []).append(ms)
    return {"client": round(float(np.median(client_ms)), 1)} | {
        stage: round(float(np.median(ms)), 1) for stage, ms in stages.items()}


def drain(url: str, mode: str, idle_ms: float, limit_s: float = 60.0) -> None:
    """Wait until requests one at a time answer within 3x the idle latency again, so that a
    run starts on an idle service (replicas that were busy with the previous run's tail)."""
    deadline = time.monotonic() + limit_s
    time.sleep(1.0)
    while (time.monotonic() < deadline
           and idle_latency_ms(url, mode) > max(3 * idle_ms, idle_ms + 50)):
        time.sleep(2.0)


def wait_ready(url: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer /healthz within {limit_s:g} s")
        time.sleep(1.0)


def within(row: dict[str, float], bound_ms: float) -> bool:
    return row["p99_ms"] <= bound_ms and not row["errors"] and not row["unanswered"]


def measure(url: str, queries: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Per mode: a ladder of rates climbed in ascending order until the first run misses the
    bound (p99, or any error or unanswered request), then the fixed rates not yet measured;
    every run bounded and started on an idle service."""
    out = {}
    for mode in args.modes:
        run_rate(url, queries, mode, 5, args, duration=3)  # warm-up of this mode's path
        time.sleep(2.0)
        idle_ms = idle_latency_ms(url, mode)
        stages = idle_stages(url, queries, mode)
        print(mode, "idle stages (ms)", stages, flush=True)
        runs: dict[float, dict[str, float]] = {}
        best = 0.0
        for rate in sorted(args.ladder):
            drain(url, mode, idle_ms)
            runs[rate] = run_rate(url, queries, mode, rate, args)
            print(mode, rate, runs[rate], flush=True)
            if not within(runs[rate], args.p99_bound_ms):
                break
            best = rate
        for rate in sorted(set(args.rates) - set(runs)):
            drain(url, mode, idle_ms)
            runs[rate] = run_rate(url, queries, mode, rate, args)
            print(mode, rate, runs[rate], flush=True)
        out[mode] = {"idle_ms": round(idle_ms, 1), "idle_stages_ms": stages,
                     "max_rate_within_bound": best,
                     "runs": {f"{r:g}": runs[r] for r in sorted(runs)}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--prepared", help="a prepared dataset (else a generated catalog)")
    parser.add_argument("--variants", default=json.dumps(DEFAULT_VARIANTS),
                        help="named variants as JSON: {name: {build: BuildIndexConfig "
                             "overrides, app: AppArgs overrides, index: an existing folder}}")
    parser.add_argument("--app", default='{"encoder": {"cpus": 0.5, "max_replicas": 1}}',
                        help="AppArgs overrides as JSON under every variant's own")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 150])
    parser.add_argument("--ladder", type=float, nargs="+",
                        default=[5, 10, 15, 20, 30, 40, 50, 65, 80, 100])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="seconds after the last arrival before open requests are cut")
    parser.add_argument("--p99-bound-ms", type=float, default=100.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--json")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="load the ingress replica's own HTTP port, not the proxy's")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    if args.direct_ingress:
        url = direct_ingress_url() or parser.error(
            "--direct-ingress needs RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (or "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1) in this process's environment")
    local_ray()
    if args.prepared:
        prepared, root = args.prepared, Path(os.environ.get("TMPDIR", "/tmp")) / "open-loop"
    else:
        tmp = synthetic_catalog(args.products, "open-loop-bench-")
        prepared, root = f"{tmp}/data", Path(tmp)
    queries = PreparedDataset(prepared).queries()["text"].to_pylist()
    rng = np.random.default_rng(0)
    queries = [queries[i] for i in rng.permutation(len(queries))]

    from ray import serve

    results, built = {}, {}
    for name, variant in json.loads(args.variants).items():
        build = variant.get("build", {})
        key = json.dumps(build, sort_keys=True)
        if "index" in variant:
            index = variant["index"]
        elif key in built:
            index = built[key]
        else:  # the first build embeds; the others reuse its vectors (same model and catalog)
            reuse = {"embeddings_from": next(iter(built.values()))} if built else {}
            index = built[key] = build_version(from_dict(BuildIndexConfig, {
                "prepared_dir": prepared, "model": args.model, "bm25": True,
                "output_root": str(root / "indexes" / name.replace(" ", "-").replace(",", ""))}
                | reuse | build)).path
        app = merged({"index": str(index)} | json.loads(args.app), variant.get("app", {}))
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        apply(serve_config([app_config(AppArgs(**app))], port=args.port))
        wait_ready(url)
        results[name] = {"build": build, "app": app, "index": str(index),
                         "modes": measure(url, queries, args)}
        print(name, json.dumps(results[name]["modes"]), flush=True)
        serve.shutdown()

    out = {"cpus": os.cpu_count(), "products": args.products if not args.prepared else None,
           "prepared": prepared, "duration_s": args.duration, "grace_s": args.grace,
           "p99_bound_ms": args.p99_bound_ms, "url": url,
           "app": json.loads(args.app), "variants": results}
    print(json.dumps(out, indent=2))
    print(f"\n| variant | mode | max rate, p99 ≤ {args.p99_bound_ms:g} ms | "
          + " | ".join(f"{r:g}/s: p50 / p99 ms, errors+unanswered" for r in args.rates)
          + "|\n|---|---|---:|" + "---:|" * len(args.rates))
    for name, v in results.items():
        for mode, m in v["modes"].items():
            fixed = [m["runs"][f"{r:g}"] for r in args.rates]
            cells = " | ".join(f"{f['p50_ms']} / {f['p99_ms']}, {f['errors']}"
                               f"+{f['unanswered']} (served {f['served_rps']}/s)"
                               for f in fixed)
            print(f"| {name} | {mode} | {m['max_rate_within_bound']:g} | {cells} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
