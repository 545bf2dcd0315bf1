"""Serving throughput and latency: HTTP through Ray Serve vs in-process encode + search, same
model, index and queries, on this machine, in one run.

    python bench/serve_load.py [--requests 400] [--concurrency 1 8] [--products 20000]

The load generator is bounded (a fixed number of requests at a fixed concurrency, loopback
only). In-process uses the same code the deployments run (LocalSearcher), with a thread pool
of the same concurrency (torch and FAISS release the GIL).
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
from retrieval_platform.serving.search import LocalSearcher


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
    parser.add_argument("--json")
    args = parser.parse_args()
    local_ray()
    tmp = synthetic_catalog(args.products, "serve-bench-")
    index = args.index or synthetic_index(tmp, args.model)
    queries = PreparedDataset(f"{tmp}/data").queries()["text"].to_pylist()
    rng = np.random.default_rng(0)
    load = [queries[i] for i in rng.integers(len(queries), size=args.requests)]

    searcher = LocalSearcher(index)
    for q in load[:20]:
        searcher.search(q, args.k)  # warm-up
    local = {c: in_process(searcher, load, c, args.k) for c in args.concurrency}
    del searcher

    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    apply(serve_config([app_config(AppArgs(index=str(index), lexical=False,
                                           encoder=json.loads(args.encoder),
                                           shard_cpus=args.shard_cpus))], port=args.port))
    url = f"http://127.0.0.1:{args.port}"
    asyncio.run(over_http(url, load[:40], 4, args.k))  # warm-up
    http = {c: asyncio.run(over_http(url, load, c, args.k)) for c in args.concurrency}
    serve.shutdown()

    rows = [{"concurrency": c, "in_process": local[c], "http": http[c],
             "qps_ratio_http_over_in_process": round(http[c]["qps"] / local[c]["qps"], 3)}
            for c in args.concurrency]
    out = {"products": args.products, "model": args.model, "requests": args.requests,
           "cpus": os.cpu_count(), "encoder": json.loads(args.encoder), "rows": rows}
    print(json.dumps(out, indent=2))
    print("\n| concurrency | in-process QPS | p50 / p99 ms | HTTP QPS | p50 / p99 ms | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, ht = r["in_process"], r["http"]
        print(f"| {r['concurrency']} | {lo['qps']} | {lo['p50_ms']} / {lo['p99_ms']} | "
              f"{ht['qps']} | {ht['p50_ms']} / {ht['p99_ms']} | "
              f"{r['qps_ratio_http_over_in_process']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
