"""Approximate search: recall@10 against exact search vs speed and memory per vector, for FAISS
index_factory strings (flat, IVF-Flat, HNSW, IVF-PQ, IVF-PQ with an exact or SQ8 re-rank of its
candidates), through the platform's own index functions; and flat indexes at Matryoshka
prefixes of the same vectors.

    python bench/ann.py [--n 1000000] [--dim 384] [--queries 1000] [--clusters 2000]
    python bench/ann.py --prepared runs/data/homedepot --model runs/models/homedepot-minilm-stage1
        [--dims 256 128 64]

Real vectors: every product of ``--prepared`` embedded by ``--model`` (Ray Data, cached under
runs/bench/ann/) and its dev queries as queries. Synthetic vectors (the default): clustered unit
vectors (a Gaussian mixture around random centres), which behave like real embedding sets;
uniform random vectors have no neighbourhood structure and make every approximate index look
worse than it is in use. Speed is queries per second for a batch of queries on all cores of this
machine, and one query at a time (as a serving shard receives them); "speedup" is relative to
exact flat search at the full dimension. Matryoshka rows
measure recall against full-dimension exact search (what shortening the vectors loses in
neighbours; the ranking quality per dimension is evaluation's NDCG@10 per d).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from retrieval_platform.index.faiss_ops import (
    IndexParams,
    build_faiss_index,
    first_dims,
    search_index,
)


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
    search_index(index, xq[:50], 10, params)  # warm-up
    started = time.perf_counter()
    _, I = search_index(index, xq, 10, params)
    return I, len(xq) / (time.perf_counter() - started)


def single_query_qps(index: faiss.Index, xq: np.ndarray, params: IndexParams,
                     n: int = 200) -> float:
    """Queries per second one at a time, as a serving shard receives them."""
    started = time.perf_counter()
    for i in range(min(n, len(xq))):
        search_index(index, xq[i : i + 1], 10, params)
    return min(n, len(xq)) / (time.perf_counter() - started)


def measure(index: faiss.Index, xq: np.ndarray, params: IndexParams, truth: np.ndarray,
            flat: tuple[float, float]) -> dict[str, float]:
    """Memory, recall@10 against ``truth`` and speed (batch and one at a time) of one index
    setting, with speedups over flat's (batch QPS, one-at-a-time QPS)."""
    I, qps = timed_search(index, xq, params)
    qps1 = single_query_qps(index, xq, params)
    return {"bytes_per_vector": round(bytes_per_vector(index), 1),
            "recall@10": round(recall_at_10(I, truth), 4), "qps": round(qps, 1),
            "speedup": round(qps / flat[0], 2), "qps_1": round(qps1, 1),
            "speedup_1": round(qps1 / flat[1], 2)}


def bytes_per_vector(index: faiss.Index) -> float:
    return faiss.serialize_index(index).nbytes / index.ntotal


def index_vectors(index_dir: str, prepared: str, split: str = "dev"
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """The product vectors an index version stored, and ``split``'s queries encoded by the
    index's model (as served)."""
    import pyarrow.parquet as pq

    from retrieval_platform.catalog.dataset import PreparedDataset
    from retrieval_platform.serving.search import load_encoder_for

    column = pq.read_table(Path(index_dir) / "embeddings", columns=["embedding"])["embedding"]
    emb = column.combine_chunks()
    xb = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
    encoder = load_encoder_for(index_dir)
    xq = encoder.encode(list(PreparedDataset(prepared).query_texts(split).values()))
    return xb.astype(np.float32), xq, encoder.model.settings.base


def real_vectors(prepared: str, model: str, split: str = "dev") -> tuple[np.ndarray, np.ndarray]:
    """Every product and every ``split`` query embedded by ``model`` (cached by model id)."""
    from _setup import local_ray

    from retrieval_platform.catalog.dataset import PreparedDataset
    from retrieval_platform.encoder.batch import EmbedConfig, collect, embed_products
    from retrieval_platform.encoder.model import DualEncoder, model_info, resolve_model_folder

    folder = resolve_model_folder(model)
    cache = Path("runs/bench/ann") / f"{Path(prepared).name}-{model_info(folder)['model_id']}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["xb"], data["xq"]
    ds = PreparedDataset(prepared)
    local_ray()
    _, xb = collect(embed_products(ds.products_dataset(["product_id", "text"]), str(folder),
                                   EmbedConfig(batch_size=1024, encode_batch_size=128,
                                               precision="auto")), ["product_id"])
    xq = DualEncoder.from_pretrained(folder).encode(list(ds.query_texts(split).values()),
                                                     "query", precision="auto")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, xb=xb, xq=xq)
    return xb, xq


def sweeps(n: int, dim: int) -> list[tuple[str, IndexParams, str, list[int]]]:
    """(factory string, params, knob, values): each index built once, searched per value."""
    nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
    nlist = 2 ** round(np.log2(nlist))
    m = dim // 8  # 8 dims per 4-bit code: 1/64 of float32's bytes
    return [
        (f"IVF{nlist},Flat", IndexParams(factory=f"IVF{nlist},Flat"), "nprobe", [4, 8, 16, 32]),
        ("HNSW32", IndexParams(factory="HNSW32", ef_search=64), "ef_search", [16, 32, 64, 128]),
        (f"IVF{nlist},PQ{m}x4fs", IndexParams(factory=f"IVF{nlist},PQ{m}x4fs"), "nprobe",
         [8, 16, 32]),
        (f"IVF{nlist},PQ{m}x4fs,RFlat", IndexParams(factory=f"IVF{nlist},PQ{m}x4fs,RFlat",
                                                    k_factor=8), "nprobe", [4, 8, 16, 32]),
        (f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)",
         IndexParams(factory=f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", k_factor=8), "nprobe",
         [4, 8, 16, 32]),
        # 8-bit codes rank candidates better; more of them re-ranked exactly (k · k_factor)
        (f"IVF{nlist},PQ{m},RFlat", IndexParams(factory=f"IVF{nlist},PQ{m},RFlat", nprobe=32),
         "k_factor", [8, 16, 32, 64]),
        ("HNSW32,ef256", IndexParams(factory="HNSW32"), "ef_search", [256]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--clusters", type=int, default=2000,
                        help="mixture centres; n/clusters near n/10 makes neighbourhoods "
                             "straddle clusters (harder for IVF than well-separated blobs)")
    parser.add_argument("--index", help="real vectors: an index version's stored embeddings "
                                        "(queries from --prepared)")
    parser.add_argument("--prepared", help="real vectors: a prepared dataset ...")
    parser.add_argument("--model", help="... embedded by this model")
    parser.add_argument("--dims", type=int, nargs="*", default=[],
                        help="also flat indexes at these Matryoshka prefixes")
    parser.add_argument("--only", nargs="*", default=[],
                        help="sweep only the indexes whose factory string contains one of these")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"{os.cpu_count()} CPUs", flush=True)
    if args.index:
        xb, xq, base = index_vectors(args.index, args.prepared)
        source = f"{Path(args.prepared).name} products from index {Path(args.index).name} ({base})"
    elif args.prepared:
        xb, xq = real_vectors(args.prepared, args.model or "minilm-l6")
        source = f"{Path(args.prepared).name} embedded by {args.model}"
    else:
        rng = np.random.default_rng(0)
        c = centres(args.clusters, args.dim, rng)
        xb = clustered(args.n, c, args.noise, rng)
        xq = clustered(args.queries, c, args.noise, rng)
        source = f"synthetic ({args.clusters} clusters, noise {args.noise})"
    n, dim = xb.shape
    rows = []

    flat = IndexParams(factory="Flat")
    started = time.perf_counter()
    index = build_faiss_index(xb, flat)
    build_s = time.perf_counter() - started
    truth, flat_qps = timed_search(index, xq, flat)
    flat_qps1 = single_query_qps(index, xq, flat)
    rows.append({"index": "Flat", "params": "-", "build_s": round(build_s, 1),
                 "bytes_per_vector": round(bytes_per_vector(index), 1), "recall@10": 1.0,
                 "qps": round(flat_qps, 1), "speedup": 1.0, "qps_1": round(flat_qps1, 1),
                 "speedup_1": 1.0})
    print(rows[-1], flush=True)
    del index
    for d in args.dims:
        params = IndexParams(factory="Flat")
        index = build_faiss_index(first_dims(xb, d), params)
        rows.append(measure(index, first_dims(xq, d), params, truth, (flat_qps, flat_qps1))
                    | {"index": f"Flat @{d} dims", "params": "-", "build_s": 0.0})
        print(rows[-1], flush=True)
        del index

    for name, params, knob, values in sweeps(n, dim):
        if args.only and not any(part in name for part in args.only):
            continue
        started = time.perf_counter()
        index = build_faiss_index(xb, params)
        build_s = time.perf_counter() - started
        for value in values:
            p = IndexParams(**{**params.__dict__, knob: value})
            rows.append(measure(index, xq, p, truth, (flat_qps, flat_qps1))
                        | {"index": name, "params": f"{knob}={value}",
                           "build_s": round(build_s, 1)})
            print(rows[-1], flush=True)
        del index

    print(f"\n{n:,} x {dim} vectors, {source}, {len(xq)} queries\n")
    print("| index (factory string) | params | build s | bytes/vector | recall@10 | batch QPS | "
          "speedup | one-at-a-time QPS | speedup |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['index']} | {r['params']} | {r['build_s']} | {r['bytes_per_vector']} | "
              f"{r['recall@10']} | {r['qps']} | {r['speedup']} | {r['qps_1']} | "
              f"{r['speedup_1']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": n, "dim": dim, "source": source,
                                               "queries": len(xq), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
