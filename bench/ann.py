"""Approximate search: recall@10 against exact search vs speed, for flat, IVF-Flat, HNSW and
IVF-PQ, on seeded vectors (1M x 384 by default), through the platform's own index functions.

    python bench/ann.py [--n 1000000] [--dim 384] [--queries 1000] [--clusters 2000]

The vectors are clustered unit vectors (a Gaussian mixture around random centres), which
behaves like real embedding sets; uniform random vectors have no neighbourhood structure and
make every approximate index look worse than it is in use. Well-separated blobs (the default:
2,000 clusters of 500) flatter IVF; many small clusters (``--clusters 100000``) put each
query's neighbours in several clusters, closer to real catalogs with many near-duplicates.
Speed is queries per second for a batch of queries on all cores of this machine; "speedup" is
relative to exact flat search.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from retrieval_platform.index.faiss_ops import IndexParams, build_index, search_index


def centres(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    c = rng.standard_normal((count, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(n: int, c: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around the centres ``c`` (chunked: bounded memory for the noise)."""
    dim = c.shape[1]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise_part = rng.standard_normal((m, dim)).astype(np.float32) * (noise / np.sqrt(dim))
        x = c[rng.integers(len(c), size=m)] + noise_part
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at_10(I: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(I, truth,
                                                                               strict=True)]))


def timed_search(index: faiss.Index, xq: np.ndarray, params: IndexParams) -> tuple[np.ndarray,
                                                                                     float]:
    started = time.perf_counter()
    _, I = search_index(index, xq, 10, params)
    return I, len(xq) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--clusters", type=int, default=2000,
                        help="mixture centres; n/clusters near n/10 makes neighbourhoods "
                             "straddle clusters (harder for IVF than well-separated blobs)")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"{os.cpu_count()} CPUs", flush=True)
    rng = np.random.default_rng(0)
    c = centres(args.clusters, args.dim, rng)
    xb = clustered(args.n, c, args.noise, rng)
    xq = clustered(args.queries, c, args.noise, rng)
    rows = []

    flat = IndexParams(kind="flat")
    started = time.perf_counter()
    index = build_index(xb, flat)
    build_s = time.perf_counter() - started
    truth, flat_qps = timed_search(index, xq, flat)
    rows.append({"index": "flat", "params": "-", "build_s": round(build_s, 1),
                 "recall@10": 1.0, "qps": round(flat_qps, 1), "speedup": 1.0})
    print(rows[-1], flush=True)
    del index

    sweeps = [
        ("ivf_flat", IndexParams(kind="ivf_flat"), "nprobe", [4, 8, 16, 32, 64]),
        ("hnsw", IndexParams(kind="hnsw", hnsw_m=32, ef_construction=64), "ef_search",
         [16, 32, 64, 128]),
        ("ivf_pq", IndexParams(kind="ivf_pq", pq_m=args.dim // 8), "nprobe", [8, 16, 32, 64]),
    ]
    for name, params, knob, values in sweeps:
        started = time.perf_counter()
        index = build_index(xb, params)
        build_s = time.perf_counter() - started
        for value in values:
            p = IndexParams(**{**params.__dict__, knob: value})
            I, qps = timed_search(index, xq, p)
            rows.append({"index": name, "params": f"{knob}={value}", "build_s": round(build_s, 1),
                         "recall@10": round(recall_at_10(I, truth), 4), "qps": round(qps, 1),
                         "speedup": round(qps / flat_qps, 2)})
            print(rows[-1], flush=True)
        del index

    print(f"\n{args.n:,} x {args.dim} vectors ({args.clusters} clusters, noise {args.noise}), "
          f"{args.queries} queries\n")
    print("| index | params | build s | recall@10 | QPS | speedup vs flat |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['index']} | {r['params']} | {r['build_s']} | {r['recall@10']} | "
              f"{r['qps']} | {r['speedup']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "dim": args.dim,
                                               "clusters": args.clusters, "noise": args.noise,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
