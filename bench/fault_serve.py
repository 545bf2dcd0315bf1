"""A shard (or ingress) replica dies under load: what the clients see, and how long until full
recovery.

    python bench/fault_serve.py [--requests 1500] [--concurrency 4]
        [--kill Ingress --ingress-replicas 2]

Bounded loopback load (fixed request count and concurrency) against the Serve app; after a
warm-up, one replica actor of Shard_1 is killed. Every response is classified: complete and
correct (equal to in-process search of the same version), partial and marked (allow_partial on
half the requests), 503, or wrong. Recovery time = from the kill to the first complete answer
after which none failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
from _setup import local_ray, synthetic_catalog, synthetic_index

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.serving.app import AppArgs
from retrieval_platform.serving.control import app_config, apply, serve_config
from retrieval_platform.serving.search import LocalSearcher
from tests.chaos import kill_serve_replica


async def run_load(url: str, queries: list[str], expected: dict[str, list[str]],
                   concurrency: int, kill_after: int, victim: str = "Shard_1") -> dict:
    gate = asyncio.Semaphore(concurrency)
    outcomes: list[tuple[float, str]] = []
    killed_at: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        async def one(i: int, q: str) -> None:
            async with gate:
                if i == kill_after and not killed_at:
                    killed_at.append(time.monotonic())
                    await asyncio.to_thread(kill_serve_replica, "retrieval", victim)
                partial = i % 2 == 1
                r = await client.post("/search", json={"query": q, "k": 5,
                                                       "allow_partial": partial})
                if r.status_code == 503:
                    kind = "503"
                elif r.status_code != 200:
                    kind = f"http_{r.status_code}"
                else:
                    body = r.json()
                    ids = [h["product_id"] for h in body["results"]]
                    if body["partial"]:
                        kind = "partial_marked" if body["shards"]["failed"] == [1] else "wrong"
                    else:
                        kind = "complete_correct" if ids == expected[q] else "wrong"
                outcomes.append((time.monotonic(), kind))

        await asyncio.gather(*(one(i, q) for i, q in enumerate(queries)))
    kill = killed_at[0]
    after = sorted((t, k) for t, k in outcomes if t >= kill)
    last_bad = max((t for t, k in after if k != "complete_correct"), default=kill)
    counts: dict[str, int] = {}
    for _, k in outcomes:
        counts[k] = counts.get(k, 0) + 1
    return {"outcomes": counts, "recovery_s": round(last_bad - kill, 2),
            "requests_after_kill": len(after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--kill", default="Shard_1", help="the deployment one replica of which "
                        "is killed: Shard_1, Ingress, QueryEncoder")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    local_ray()
    tmp = synthetic_catalog(args.products, "fault-serve-")
    index = synthetic_index(tmp, "minilm-l6", bm25=False)
    queries = PreparedDataset(f"{tmp}/data").queries()["text"].to_pylist()[:50]
    local = LocalSearcher(index)
    expected = {q: [h["product_id"] for h in local.search(q, 5)] for q in queries}
    del local

    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    apply(serve_config([app_config(AppArgs(index=str(index), lexical=False,
                                           request_timeout_s=5.0,
                                           ingress_replicas=args.ingress_replicas))],
                 port=args.port))
    load = [queries[i % len(queries)] for i in range(args.requests)]
    result = asyncio.run(run_load(f"http://127.0.0.1:{args.port}", load, expected,
                                  args.concurrency, kill_after=args.requests // 5,
                                  victim=args.kill))
    serve.shutdown()
    out = {"requests": args.requests, "concurrency": args.concurrency, "killed": args.kill,
           "ingress_replicas": args.ingress_replicas} | result
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
