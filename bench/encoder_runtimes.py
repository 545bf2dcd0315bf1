"""The query encoder's runtimes side by side (#27): torch and ONNX Runtime, fp32 and int8, on an
index version's stored product vectors and its dataset's dev queries.

    python bench/encoder_runtimes.py --index runs/indexes/homedepot/zs-flat2
        [--split dev] [--threads 1] [--json docs/bench/encoder_runtimes.json]

Per variant: the lowest and mean cosine of its query vectors to torch fp32's, the overlap of
its exact top 10 with torch fp32's, NDCG@10 on the split over the full corpus with the paired
95 % bootstrap interval of its difference to torch fp32, and the encode latency of one query
at a time and of batches of 8 (the served encoder's batches), with ``threads`` intra-op
threads (Ray gives a 0.5-CPU replica one). Products keep the index's vectors (torch): this is
what serving queries under another runtime against an index built under torch gives.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.encoder.batch import vectors_of
from retrieval_platform.encoder.model import DualEncoder, resolve_model_folder
from retrieval_platform.index.faiss_ops import IndexParams, build_faiss_index, search_index
from retrieval_platform.index.store import load_manifest
from retrieval_platform.metrics import ndcg_at_k
from retrieval_platform.stats import paired_bootstrap

VARIANTS = [("torch", "fp32"), ("torch", "bf16"), ("torch", "int8"), ("onnx", "fp32"),
            ("onnx", "int8")]


def latency_ms(model: DualEncoder, texts: list[str], runtime: str, precision: str,
               batch: int, rounds: int = 3) -> float:
    """Median milliseconds per query, encoding ``texts`` in batches of ``batch``."""
    per_query = []
    for _ in range(rounds):
        lap = time.perf_counter()
        for i in range(0, len(texts), batch):
            model.encode(texts[i : i + batch], "query", precision=precision, runtime=runtime)
        per_query.append((time.perf_counter() - lap) * 1000 / len(texts))
    return round(float(np.median(per_query)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = load_manifest(args.index)
    ds = PreparedDataset(manifest.dataset.path)
    stored = pq.read_table(Path(manifest.path) / "embeddings")
    ids = stored["product_id"].to_pylist()
    xb = vectors_of(stored["embedding"])  # (n, d)
    queries = ds.queries(args.split, ["query_id", "text"])
    qids, qtexts = queries["query_id"].to_pylist(), queries["text"].to_pylist()
    qrels = ds.qrels(args.split)
    model = DualEncoder.from_pretrained(resolve_model_folder(manifest.model.path))
    index = build_faiss_index(xb, IndexParams())

    rows, per_query, reference = [], {}, None
    for runtime, precision in VARIANTS:
        xq = model.encode(qtexts, "query", precision=precision, runtime=runtime)  # (nq, d)
        _, I = search_index(index, xq, 10, IndexParams())  # (nq, 10)
        per_query[(runtime, precision)] = {
            q: {"ndcg@10": ndcg_at_k([ids[i] for i in I[n] if i >= 0], qrels.get(q, {}),
                                     ds.scale.gain, 10)}
            for n, q in enumerate(qids)}
        if reference is None:
            reference = (xq, I)
        cosine = np.sum(reference[0] * xq, axis=1)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reference[1], I,
                                                                    strict=True)])
        sample = qtexts[: args.latency_queries]
        rows.append({
            "runtime": runtime, "precision": precision,
            "cosine_min": round(float(cosine.min()), 5),
            "cosine_mean": round(float(cosine.mean()), 6),
            "top10_overlap": round(float(overlap), 4),
            "ndcg@10": round(float(np.mean([m["ndcg@10"] for m in
                                            per_query[(runtime, precision)].values()])), 4),
            "delta_vs_torch_fp32": str(paired_bootstrap(
                per_query[("torch", "fp32")], per_query[(runtime, precision)], "ndcg@10")),
            "ms_per_query_batch1": latency_ms(model, sample, runtime, precision, 1),
            "ms_per_query_batch8": latency_ms(model, sample, runtime, precision, 8)})
        print(json.dumps(rows[-1]), flush=True)

    base = rows[0]
    print(f"\n{len(qids)} {args.split} queries, {len(ids):,} products of {manifest.path}, "
          f"{args.threads} thread(s)\n")
    print("| runtime | precision | cosine min / mean | top-10 overlap | NDCG@10 | Δ vs torch "
          "fp32 [95 % CI] | ms/query, 1 at a time | ms/query, batches of 8 | speedup (1 / 8) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = (f"{base['ms_per_query_batch1'] / r['ms_per_query_batch1']:.2f}× / "
                 f"{base['ms_per_query_batch8'] / r['ms_per_query_batch8']:.2f}×")
        print(f"| {r['runtime']} | {r['precision']} | {r['cosine_min']} / {r['cosine_mean']} "
              f"| {r['top10_overlap']} | {r['ndcg@10']} | {r['delta_vs_torch_fp32']} | "
              f"{r['ms_per_query_batch1']} | {r['ms_per_query_batch8']} | {speed} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"index": manifest.path, "split": args.split,
                                               "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
