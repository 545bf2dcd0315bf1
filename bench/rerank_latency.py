"""What the cross-encoder reranker costs per query, on this machine, in one run.

    python bench/rerank_latency.py --model runs/models/homedepot-rerank-minilm
        [--prepared runs/data/homedepot] [--depths 20 50 100] [--layers 1 2 3 6]
        [--index runs/indexes/synthetic-smoke] [--out docs/bench/rerank_latency.json]

1. In process: ``CrossEncoder.rerank`` of one query against its BM25 top N (real product texts
   and query lengths), per depth, per number of layers kept (the trained model cut, as
   ``num_layers`` cuts it) and precision (fp32, int8); the p50 and p90 over 30 dev queries,
   torch on every core.
2. Served (with ``--index``): the same app with the reranker deployed, one request at a time,
   ``"rerank": true`` at depth 50 against none: the client's p50 and p99, and the ingress's own
   ``timings_ms.rerank`` (the hop to the reranker, its batching and scoring). The reranker
   reads the index's own catalog texts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.reranker.model import CrossEncoder


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def in_process(model_dir: str, prepared: str, depths: list[int], layers: list[int],
               queries: int) -> list[dict]:
    ds = PreparedDataset(prepared)
    products = ds.products(["product_id", "text"])
    texts = products["text"].to_pylist()
    bm25 = BM25Retriever(products["product_id"].to_pylist(), texts)
    pos = {p: i for i, p in enumerate(products["product_id"].to_pylist())}
    qtexts = sorted(ds.query_texts("dev").values())[:queries]
    top = max(depths)
    candidates = [[texts[pos[p]] for p, _ in hits] for hits in bm25.search(qtexts, top)]
    rows = []
    for n_layers in layers:
        model = CrossEncoder.from_pretrained(model_dir, num_layers=n_layers)
        for precision in ("fp32", "int8"):
            model.rerank(qtexts[0], candidates[0][:top], precision=precision)  # warm up
            for depth in depths:
                ms = []
                for q, cands in zip(qtexts, candidates, strict=True):
                    started = time.perf_counter()
                    model.rerank(q, cands[:depth], precision=precision)
                    ms.append((time.perf_counter() - started) * 1000)
                rows.append({"layers": n_layers, "precision": precision, "depth": depth,
                             "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def served(model_dir: str, index: str, requests: int) -> dict:
    import httpx
    from _setup import local_ray
    from ray import serve

    from retrieval_platform.serving.app import AppArgs
    from retrieval_platform.serving.control import app_config, apply, serve_config

    local_ray()
    port = 8123
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # one replica on both cores; a timeout that a cold first batch cannot hit
    args = AppArgs(index=index, reranker={"model": str(Path(model_dir).absolute()),
                                          "depth": 50, "cpus": 1.0, "threads": 2,
                                          "timeout_s": 30.0})
    apply(serve_config([app_config(args)], port=port))
    queries = ["cordless drill", "red shoes", "kettle", "bed sheets", "garden hose 50 ft",
               "led bulb", "bathroom vanity", "paint roller"]
    out = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for q in queries:  # warm up both paths
            client.post("/search", json={"query": q, "k": 10, "rerank": True})
        for rerank in (False, True, False, True):  # interleaved: no drift favours one
            client_ms, stage_ms = [], []
            for i in range(requests):
                started = time.perf_counter()
                r = client.post("/search", json={"query": queries[i % len(queries)], "k": 10,
                                                 "rerank": rerank})
                client_ms.append((time.perf_counter() - started) * 1000)
                body = r.json()
                assert r.status_code == 200 and body["reranked"] == rerank, body
                stage_ms.append(body["timings_ms"].get("rerank", 0.0))
            key = "rerank_50" if rerank else "first_stage"
            prev = out.get(key, {"client": [], "stage": []})
            out[key] = {"client": prev["client"] + client_ms, "stage": prev["stage"] + stage_ms}
    serve.shutdown()
    return {k: {"client_p50_ms": pct(v["client"], 50), "client_p99_ms": pct(v["client"], 99),
                "rerank_stage_p50_ms": pct(v["stage"], 50), "requests": len(v["client"])}
            for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prepared", default="runs/data/homedepot")
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--layers", type=int, nargs="*", default=[1, 2, 3, 6],
                    help="none: keep the in-process rows of --out, measure served only")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--index", default=None)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--out", default="docs/bench/rerank_latency.json")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                          "torch_threads": torch.get_num_threads()}, "model": a.model}
    if a.layers:
        result["in_process"] = in_process(a.model, a.prepared, a.depths, a.layers, a.queries)
    elif Path(a.out).is_file():
        result["in_process"] = json.loads(Path(a.out).read_text()).get("in_process", [])
    if a.index:
        result["served"] = served(a.model, a.index, a.requests)
        print(json.dumps(result["served"], indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
