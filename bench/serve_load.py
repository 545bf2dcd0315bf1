"""Serving throughput and latency: HTTP through Ray Serve vs in-process encode + search, same
model, index and queries, on this machine, in one run; and where the time of one request goes.

    python bench/serve_load.py [--requests 400] [--concurrency 1 8] [--products 20000]
        [--index runs/indexes/homedepot/vN --prepared runs/data/homedepot]
        [--wrk --duration 20] [--encoder '{"precision": "int8"}']

The load generator is bounded (a fixed number of requests at a fixed concurrency, loopback
only): httpx by default, or ``wrk`` (``apt-get install wrk``) for a fixed duration per
concurrency with its latency histogram. In-process uses the same code the deployments run
(LocalSearcher), with a thread pool of the same concurrency (torch and FAISS release the GIL).

Per hop, at concurrency 1: the client's latency, the ingress's own laps (``timings_ms`` of each
response: encoder call, shard fan-out, merge), and the same steps in process (encoding, every
shard's search, the merge); the differences are what each hop adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from _setup import local_ray, synthetic_catalog, synthetic_index

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.serving.app import AppArgs
from retrieval_platform.serving.control import app_config, apply, serve_config
from retrieval_platform.serving.search import LocalSearcher, merge_hits, shard_hits


def percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def in_process(searcher: LocalSearcher, queries: list[str], concurrency: int, k: int
               ) -> dict[str, float]:
    def one(q: str) -> float:
        t = time.perf_counter()
        searcher.search(q, k)
        return time.perf_counter() - t

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, queries))
    qps = len(queries) / (time.perf_counter() - started)
    return {"qps": round(qps, 1)} | percentiles(latencies)


async def over_http(url: str, queries: list[str], concurrency: int, k: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=30.0,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(q: str) -> None:
            nonlocal errors
            async with gate:
                t = time.perf_counter()
                r = await client.post("/search", json={"query": q, "k": k})
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one(q) for q in queries))
        wall = time.perf_counter() - started
    return {"qps": round(len(queries) / wall, 1), "errors": errors} | percentiles(latencies)


WRK_SCRIPT = """
bodies = {%s}
i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/search", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def with_wrk(url: str, queries: list[str], concurrency: int, k: int, duration: int
             ) -> dict[str, float]:
    """``wrk`` at ``concurrency`` connections for ``duration`` seconds, cycling the queries."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("wrk") is None:
        raise SystemExit("--wrk needs wrk on PATH (apt-get install wrk)")
    bodies = ", ".join(json.dumps(json.dumps({"query": q, "k": k})) for q in queries)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % bodies)
    out = subprocess.run(
        ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{duration}s",
         "--latency", "--timeout", "10s", "-s", f.name, url], capture_output=True, text=True,
        check=True).stdout
    os.unlink(f.name)

    fields = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    errors = int(fields["Non-2xx"][-1]) if "Non-2xx" in fields else 0
    if "Socket" in fields:  # "Socket errors: connect 0, read 0, write 0, timeout 2"
        errors += sum(int(n.rstrip(",")) for n in fields["Socket"][2::2])
    requests = next(int(line.split()[0]) for line in out.splitlines() if "requests in" in line)
    return {"qps": round(float(fields["Requests/sec:"][0]), 1), "errors": errors,
            "requests": requests} | {f"p{p}_ms": round(wrk_ms(fields[f"{p}%"][0]), 1)
                                     for p in (50, 90, 99)}


def wrk_ms(token: str) -> float:
    """wrk's "850.00us", "43.00ms", "1.20s" in milliseconds."""
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if token.endswith(unit):
            return float(token[: -len(unit)]) * scale
    raise ValueError(f"not a wrk duration: {token!r}")


def hops(url: str, searcher_index: str, queries: list[str], k: int) -> dict[str, float]:
    """Mean milliseconds per step of one request at a time: over HTTP (client, ingress laps)
    and in process (the same steps without hops)."""
    import statistics

    searcher = LocalSearcher(searcher_index)
    local: dict[str, list[float]] = {"encode": [], "shards": [], "merge": []}
    for q in queries:
        t = time.perf_counter()
        xq = searcher.encoder.encode([q], "query")
        t1 = time.perf_counter()
        per_shard = [shard_hits(s, xq, k, None) for s in searcher.shards]
        t2 = time.perf_counter()
        merge_hits(per_shard, k)
        t3 = time.perf_counter()
        for name, a, b in (("encode", t, t1), ("shards", t1, t2), ("merge", t2, t3)):
            local[name].append((b - a) * 1000)
    remote: dict[str, list[float]] = {"client": [], "total": [], "encode": [], "shards": [],
                                      "merge": []}
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for q in queries:
            t = time.perf_counter()
            timings = client.post("/search", json={"query": q, "k": k}).json()["timings_ms"]
            remote["client"].append((time.perf_counter() - t) * 1000)
            for name in ("total", "encode", "shards", "merge"):
                remote[name].append(timings.get(name, float("nan")))  # older services: fewer
    mean = {f"http_{n}": round(statistics.fmean(v), 2) for n, v in remote.items()}
    return mean | {f"local_{n}": round(statistics.fmean(v), 2) for n, v in local.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="an existing index version folder (else one is built)")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--products", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--encoder", default='{"cpus": 0.5, "min_replicas": 1, "max_replicas": 2}',
                        help="EncoderArgs as JSON (cpus, replicas, threads, batching)")
    parser.add_argument("--shard-cpus", type=float, default=0.1)
    parser.add_argument("--variants", default='{"default": {}}',
                        help='named AppArgs overrides as JSON, each deployed and measured in '
                             'turn, e.g. {"alone": {"ingress_max_batch_size": 1}, "int8": '
                             '{"encoder": {"precision": "int8"}}}')
    parser.add_argument("--prepared", help="queries from this prepared dataset (with --index)")
    parser.add_argument("--wrk", action="store_true", help="load HTTP with wrk (by duration)")
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument("--json")
    args = parser.parse_args()
    local_ray()
    if args.index and args.prepared:
        index, prepared = args.index, args.prepared
    else:
        tmp = synthetic_catalog(args.products, "serve-bench-")
        index, prepared = args.index or synthetic_index(tmp, args.model), f"{tmp}/data"
    queries = PreparedDataset(prepared).queries()["text"].to_pylist()
    rng = np.random.default_rng(0)
    load = [queries[i] for i in rng.integers(len(queries), size=args.requests)]

    searcher = LocalSearcher(index)
    for q in load[:20]:
        searcher.search(q, args.k)  # warm-up
    local = {c: in_process(searcher, load, c, args.k) for c in args.concurrency}
    del searcher

    from ray import serve

    url = f"http://127.0.0.1:{args.port}"
    variants = {}
    for name, overrides in json.loads(args.variants).items():
        app = {"index": str(index), "lexical": False, "encoder": json.loads(args.encoder),
               "shard_cpus": args.shard_cpus}
        app |= {k: (app[k] | v if isinstance(v, dict) else v) for k, v in overrides.items()}
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        apply(serve_config([app_config(AppArgs(**app))], port=args.port))
        asyncio.run(over_http(url, load[:40], 4, args.k))  # warm-up
        per_hop = hops(url, index, load[:100], args.k)
        if args.wrk:
            http = {c: with_wrk(url, load, c, args.k, args.duration) for c in args.concurrency}
        else:
            http = {c: asyncio.run(over_http(url, load, c, args.k)) for c in args.concurrency}
        serve.shutdown()
        variants[name] = {"app": {k: v for k, v in app.items() if k != "index"}, "hops_ms": per_hop,
                          "rows": [{"concurrency": c, "http": http[c],
                                    "qps_ratio_http_over_in_process":
                                        round(http[c]["qps"] / local[c]["qps"], 3)}
                                   for c in args.concurrency]}
        print(name, json.dumps(variants[name]), flush=True)

    out = {"index": str(index), "requests": args.requests, "load": "wrk" if args.wrk else
           "httpx", "cpus": os.cpu_count(), "in_process": local, "variants": variants}
    print(json.dumps(out, indent=2))
    for name, v in variants.items():
        h = v["hops_ms"]
        print(f"\n{name}: hop (concurrency 1, mean ms) | HTTP | in process | added\n"
              "|---|---:|---:|---:|")
        print(f"| client → proxy → ingress → client | {h['http_client']} | – | "
              f"{h['http_client'] - h['http_total']:.2f} |")
        for step in ("encode", "shards", "merge"):
            print(f"| {step} | {h[f'http_{step}']} | {h[f'local_{step}']} | "
                  f"{h[f'http_{step}'] - h[f'local_{step}']:.2f} |")
    print("\n| variant | concurrency | HTTP QPS | p50 / p99 ms | errors | in-process QPS | "
          "p50 / p99 ms | ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, v in variants.items():
        for r in v["rows"]:
            lo, ht = local[r["concurrency"]], r["http"]
            print(f"| {name} | {r['concurrency']} | {ht['qps']} | {ht['p50_ms']} / "
                  f"{ht['p99_ms']} | {ht['errors']} | {lo['qps']} | {lo['p50_ms']} / "
                  f"{lo['p99_ms']} | {r['qps_ratio_http_over_in_process']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
