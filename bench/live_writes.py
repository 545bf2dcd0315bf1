"""Live catalog writes through Ray Serve, one run: writes/s (single and bulk upserts, patches)
against the plain embedding rate of the same model; how soon an acknowledged write is
searchable; search latency (open loop) with and without a write load.

    python bench/live_writes.py --prepared runs/data/homedepot --model minilm-l6
        [--index runs/indexes/homedepot/vN] [--json docs/bench/live_writes.json]

The index is built here from ``--prepared`` with ``--model`` into a temporary root (or
``--index`` is copied there): the benchmark writes to that root's change log, never to yours.

- plain embedding rate: ``encode_products`` of the index's model in this process (torch on
  every core, no HTTP, no log): the ceiling of an upsert.
- writes: closed loop (a fixed number of requests at a fixed concurrency), upserts of catalog
  products under new ids, patches of price and stock.
- visibility: single upserts and patches paced at a fixed rate while a poller searches (lexical,
  back to back); a write's visibility is the first answer with ``applied_position`` >= its
  seq among the searches sent after its acknowledgement, minus the acknowledgement's time
  (an upper bound: it includes that search's own latency, reported beside it).
- search: dense requests at a fixed rate (open loop, latency from the scheduled send time),
  alone and with a write load beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _load import open_loop
from _setup import local_ray

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import from_dict
from retrieval_platform.index.build import BuildIndexConfig, build_version
from retrieval_platform.serving.app import AppArgs
from retrieval_platform.serving.control import app_config, apply, serve_config
from retrieval_platform.serving.search import load_encoder_for

WRITE_KEY = "bench-write-key-0123456789"
FIELDS = ("title", "description", "brand", "category", "price")


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 1) if values else float("nan")


def product_fields(rows: list[dict], i: int) -> dict:
    row = rows[i % len(rows)]
    return {k: row[k] for k in FIELDS if row.get(k) is not None}


async def closed_loop(url: str, requests: list[tuple[str, str, dict | None]],
                      concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    errors, latencies = 0, []
    async with httpx.AsyncClient(base_url=url, headers={"X-Write-Key": WRITE_KEY},
                                 timeout=120.0) as client:
        async def one(method: str, path: str, body: dict | None) -> None:
            nonlocal errors
            async with gate:
                t = time.perf_counter()
                r = await client.request(method, path, json=body)
                latencies.append(time.perf_counter() - t)
                if r.status_code >= 300 or (path.endswith(":bulk") and r.json()["errors"]):
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(*r) for r in requests))
        wall = time.perf_counter() - started
    return {"requests": len(requests), "wall_s": round(wall, 2), "errors": errors,
            "p50_ms": ms(latencies, 50), "p99_ms": ms(latencies, 99)}


def visibility(url: str, rows: list[dict], ids: list[str], rate: float, duration_s: float
               ) -> dict:
    """Paced single writes (upserts and patches alternating) while a poller searches."""
    observed: list[tuple[float, float, int]] = []  # (sent, answered, applied_position)
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            while not stop.is_set():
                sent = time.perf_counter()
                r = client.post("/search", json={"query": "drill", "k": 1, "mode": "lexical"})
                observed.append((sent, time.perf_counter(), r.json()["applied_position"]))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    acks: list[tuple[float, int]] = []
    with httpx.Client(base_url=url, headers={"X-Write-Key": WRITE_KEY}, timeout=60.0) as client:
        start = time.perf_counter()
        for i in range(int(rate * duration_s)):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            if i % 2:
                r = client.patch(f"/products/{ids[i % len(ids)]}", json={"price": float(i)})
            else:
                r = client.put(f"/products/vis-{i}", json=product_fields(rows, i))
            acks.append((time.perf_counter(), r.json()["seq"]))
    time.sleep(2.0)
    stop.set()
    poller.join()
    lags, search = [], [answered - sent for sent, answered, _ in observed]
    for acked, seq in acks:
        seen = next((answered for sent, answered, pos in observed
                     if sent >= acked and pos >= seq), None)
        if seen is not None:
            lags.append(seen - acked)
    return {"writes": len(acks), "rate_per_s": rate, "observed": len(lags),
            "p50_ms": ms(lags, 50), "p99_ms": ms(lags, 99), "max_ms": ms(lags, 100),
            "poll_search_p50_ms": ms(search, 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="runs/data/homedepot")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--index", help="an index version to copy (else one is built)")
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--search-rate", type=float, default=6.0,
                        help="dense searches a second (open loop): below the box's capacity")
    parser.add_argument("--write-rate", type=float, default=4.0,
                        help="write requests a second beside them: half single upserts, half "
                             "bulk patches of 100")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    cpus = local_ray()
    root = Path(tempfile.mkdtemp(prefix="live-bench-"))
    if args.index:
        shutil.copytree(args.index, root / "v1")
        index = root / "v1"
    else:
        build_started = time.perf_counter()
        index = Path(build_version(from_dict(BuildIndexConfig, {
            "prepared_dir": args.prepared, "model": args.model, "output_root": str(root),
            "version": "v1", "num_shards": 2})).path)
        print(f"built in {time.perf_counter() - build_started:.0f}s", flush=True)
    ds = PreparedDataset(args.prepared)
    rows = ds.products(["product_id", *FIELDS]).to_pylist()
    ids = [r["product_id"] for r in rows]
    queries = ds.queries()["text"].to_pylist()

    encoder = load_encoder_for(index)
    texts = ds.products(["text"])["text"].to_pylist()[:512]
    encoder.encode_products(texts[:32])  # warm-up
    t = time.perf_counter()
    encoder.encode_products(texts)
    plain_rate = len(texts) / (time.perf_counter() - t)
    del encoder

    from ray import serve

    (root / "write_key").write_text(WRITE_KEY)
    url = f"http://127.0.0.1:{args.port}"
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app = AppArgs(index=str(index), write_key_file=str(root / "write_key"),
                  encoder={"cpus": 0.5, "min_replicas": 1, "max_replicas": 1})
    apply(serve_config([app_config(app)], port=args.port))

    def upserts(prefix: str, n: int) -> list:
        return [("PUT", f"/products/{prefix}-{i}", product_fields(rows, i)) for i in range(n)]

    def bulk(prefix: str, batches: int, size: int, op: str) -> list:
        items = lambda b: [  # noqa: E731
            {"op": "upsert", "product_id": f"{prefix}-{b}-{i}",
             "product": product_fields(rows, b * size + i)} if op == "upsert" else
            {"op": "patch", "product_id": ids[(b * size + i) % len(ids)],
             "product": {"price": float(i % 500), "in_stock": bool(i % 3)}}
            for i in range(size)]
        return [("POST", "/products:bulk", {"items": items(b)}) for b in range(batches)]

    patches = [("PATCH", f"/products/{ids[i]}", {"price": float(i % 300)}) for i in range(600)]
    asyncio.run(closed_loop(url, upserts("warm", 16), 4))
    writes = {
        "single upserts (8 concurrent)": (asyncio.run(closed_loop(url, upserts("s", 200), 8)),
                                          200),
        "bulk upserts (4 x 250)": (asyncio.run(closed_loop(url, bulk("b", 4, 250, "upsert"), 1)),
                                   1000),
        "single patches (16 concurrent)": (asyncio.run(closed_loop(url, patches, 16)), 600),
        "bulk patches (5 x 1000)": (asyncio.run(closed_loop(url, bulk("p", 5, 1000, "patch"), 1)),
                                    5000),
    }
    write_rows = {name: r | {"writes_per_s": round(n / r["wall_s"], 1),
                             "over_plain_embedding": round(n / r["wall_s"] / plain_rate, 3)}
                  for name, (r, n) in writes.items()}
    for name, r in write_rows.items():
        print(name, json.dumps(r), flush=True)

    vis = visibility(url, rows, ids, rate=10.0, duration_s=args.duration)
    print("visibility", json.dumps(vis), flush=True)

    def search(i: int) -> tuple[str, str, dict]:
        return "POST", "/search", {"query": queries[i % len(queries)], "k": 10}

    alone = asyncio.run(open_loop(url, search, args.search_rate, args.duration))

    async def with_writes() -> tuple:
        def write(i: int) -> tuple[str, str, dict]:
            if i % 2:
                return "POST", "/products:bulk", {"items": [
                    {"op": "patch", "product_id": ids[(i * 100 + j) % len(ids)],
                     "product": {"price": float(j)}} for j in range(100)]}
            return "PUT", f"/products/load-{i}", product_fields(rows, i)

        return await asyncio.gather(
            open_loop(url, search, args.search_rate, args.duration),
            open_loop(url, write, args.write_rate, args.duration,
                      headers={"X-Write-Key": WRITE_KEY}))

    loaded, write_load = asyncio.run(with_writes())
    serve.shutdown()
    search_rows = {"alone": alone.summary(), "with writes": loaded.summary(),
                   "write load": write_load.summary() | {
                       "what": f"{args.write_rate:g} requests/s: half single upserts, half bulk "
                               "patches of 100"}}
    ratio = round(search_rows["with writes"]["p99_ms"] / search_rows["alone"]["p99_ms"], 2)
    out = {"prepared": args.prepared, "model": args.model, "cpus": cpus,
           "products": len(ids), "plain_embedding_per_s": round(plain_rate, 1),
           "writes": write_rows, "visibility": vis, "search": search_rows,
           "search_p99_ratio_with_writes": ratio}
    print(json.dumps(out, indent=2))
    print(f"\nplain embedding: {plain_rate:.1f} products/s\n\n| writes | writes/s | × plain "
          "embedding | request p50 / p99 ms | errors |\n|---|---:|---:|---:|---:|")
    for name, r in write_rows.items():
        print(f"| {name} | {r['writes_per_s']} | {r['over_plain_embedding']} | "
              f"{r['p50_ms']} / {r['p99_ms']} | {r['errors']} |")
    print(f"\nvisibility ({vis['writes']} writes at {vis['rate_per_s']}/s): p50 {vis['p50_ms']} "
          f"ms, p99 {vis['p99_ms']} ms, max {vis['max_ms']} ms (poll search p50 "
          f"{vis['poll_search_p50_ms']} ms)\n\n| dense search at {args.search_rate}/s | served/s "
          "| p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|")
    for name in ("alone", "with writes"):
        r = search_rows[name]
        print(f"| {name} | {r['served_rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    print(f"\nsearch p99 with writes / without: {ratio}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os._exit(0)  # Ray's atexit hooks can hang after serve.shutdown on a busy box


if __name__ == "__main__":
    main()
