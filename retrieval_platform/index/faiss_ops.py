"""FAISS building blocks as plain typed functions on numpy (in the style of ``faiss.contrib``).

Conventions: ``xb`` (n, d) database vectors, ``xq`` (nq, d) queries, ``k`` results, ``D`` (nq, k)
scores (inner product; cosine for unit vectors), ``I`` (nq, k) ids (-1 where fewer than k exist).
Shards hold contiguous row ranges of the database; a shard's local id + its offset is the global
id. Exact sharded search returns the same ids and scores as one flat index.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["flat", "ivf_flat", "hnsw", "ivf_pq"]


def first_dims(x: np.ndarray, dim: int | None) -> np.ndarray:
    """Matryoshka: the first ``dim`` dimensions of unit vectors (n, d), renormalised (as
    ``encoder.model.truncate``); ``None`` or ``dim >= d`` returns ``x``."""
    if dim is None or dim >= x.shape[1]:
        return x
    x = np.ascontiguousarray(x[:, :dim], dtype=np.float32)  # (n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


@dataclass
class IndexParams:
    """How each shard is built and searched (flat inner product by default)."""

    kind: IndexKind = "flat"
    nlist: int | None = None  # IVF lists; default 4·sqrt(n), at most n/39 (FAISS's 39 per list)
    nprobe: int = 16  # IVF lists visited per query
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 80
    ef_search: int = 64
    pq_m: int | None = None  # PQ sub-quantizers; default d/8 (must divide d)
    pq_nbits: int = 8
    train_size: int = 100_000  # vectors sampled to train IVF / PQ (at least 39 per list)
    filter_exact_fraction: float = 0.2  # filters keeping less than this: exact search on subset
    # a FAISS index_factory string (inner product), used instead of ``kind``: "Flat",
    # "IVF1024,Flat", "HNSW32", "IVF1024,PQ48x8", "IVF1024,PQ48x4fs,RFlat" (IVF-PQ whose
    # candidates are re-ranked with the exact vectors), ...; nprobe / ef_search still apply
    factory: str | None = None
    k_factor: int = 4  # refined indexes (",RFlat"): k · k_factor candidates re-ranked exactly

    def __post_init__(self) -> None:
        if self.nprobe < 1 or self.ef_search < 1 or self.hnsw_m < 2 or self.k_factor < 1:
            raise ValueError("nprobe, ef_search, k_factor must be >= 1 and hnsw_m >= 2")


def build_faiss_index(xb: np.ndarray, params: IndexParams, seed: int = 0) -> faiss.Index:
    """Build one index over ``xb`` (inner product)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if params.factory:
        return _from_factory(xb, params, seed)
    if params.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, ip)
        index.hnsw.efConstruction = params.ef_construction
    else:
        nlist = params.nlist or int(max(1, min(4 * np.sqrt(n), n // 39)))
        quantizer = faiss.IndexFlatIP(d)
        if params.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        elif params.kind == "ivf_pq":
            m = params.pq_m or max(1, d // 8)
            if d % m:
                raise ValueError(f"pq_m={m} must divide the dimension {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, params.pq_nbits, ip)
        else:
            raise ValueError(f"unknown index kind {params.kind!r}")
        rng = np.random.default_rng(seed)
        # FAISS wants >= 39 training points per list: grow the sample for large nlist
        size = max(params.train_size, 39 * nlist)
        sample = xb if n <= size else xb[rng.choice(n, size, replace=False)]
        index.cp.seed = seed
        index.train(sample)
    index.add(xb)
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()  # lets filtered search reconstruct vectors by id
    return index


def _from_factory(xb: np.ndarray, params: IndexParams, seed: int) -> faiss.Index:
    """An index from ``params.factory`` (inner product), trained on a seeded sample."""
    n, d = xb.shape
    try:
        index = faiss.index_factory(d, params.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build {params.factory!r} for d={d}: "
                         f"{str(exc).splitlines()[-1]}") from None
    ivf = _ivf_of(index)
    if not index.is_trained:
        lists = ivf.nlist if ivf is not None else 1
        size = max(params.train_size, 39 * lists, 256 * 39)  # PQ's 256 centroids want 39 each
        rng = np.random.default_rng(seed)
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(xb if n <= size else xb[rng.choice(n, size, replace=False)])
    index.add(xb)
    if ivf is not None:
        ivf.make_direct_map()  # filtered search reconstructs vectors by id
    return index


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def exact_vectors(index: faiss.Index) -> bool:
    """Whether ``index.reconstruct`` gives back the exact vectors (flat storage)."""
    if isinstance(index, faiss.IndexRefine):
        return isinstance(faiss.downcast_index(index.refine_index), faiss.IndexFlat)
    return isinstance(index, faiss.IndexFlat | faiss.IndexIVFFlat | faiss.IndexHNSWFlat)


def _search_params(index: faiss.Index, params: IndexParams,
                   selector: faiss.IDSelector | None) -> faiss.SearchParameters:
    if isinstance(index, faiss.IndexRefine):  # the base index's parameters, k · k_factor deep
        base = _search_params(faiss.downcast_index(index.base_index), params, selector)
        return faiss.IndexRefineSearchParameters(k_factor=params.k_factor,
                                                 base_index_params=base, sel=selector)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=params.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=params.ef_search)
    return faiss.SearchParameters(sel=selector)


def search_index(
    index: faiss.Index,
    xq: np.ndarray,
    k: int,
    params: IndexParams,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search one index; ``allowed`` (n,) bool restricts results to those rows (filters).

    Selective filters on approximate indexes search the allowed rows exactly instead (a graph
    or an inverted list walk may never reach a rare allowed row).
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if allowed is None:
        return index.search(xq, k, params=_search_params(index, params, None))
    ids = np.flatnonzero(allowed).astype(np.int64)
    if ids.size == 0:
        return (np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64))
    selective = ids.size < params.filter_exact_fraction * index.ntotal
    if selective and not isinstance(index, faiss.IndexFlat):
        if exact_vectors(index):
            return subset_topk(xq, index.reconstruct_batch(ids), ids, k)
        ivf = _ivf_of(index)
        if ivf is not None:
            params = dataclasses.replace(params, nprobe=ivf.nlist)  # visit every list
    selector = faiss.IDSelectorBatch(ids)
    return index.search(xq, k, params=_search_params(index, params, selector))


def subset_topk(xq: np.ndarray, xs: np.ndarray, ids: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``xq`` against the rows ``xs`` whose ids are ``ids``."""
    D, I = brute_force_topk(xq, xs, k)
    return D, np.where(I >= 0, ids[np.clip(I, 0, None)], -1)


def brute_force_topk(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference exact search with numpy (ties broken by the smaller id)."""
    scores = xq.astype(np.float32) @ xb.astype(np.float32).T  # (nq, n)
    kk = min(k, xb.shape[0])
    I = np.argsort(-scores, axis=1, kind="stable")[:, :kk]  # (nq, kk)
    D = np.take_along_axis(scores, I, axis=1)  # (nq, kk)
    if kk < k:
        D = np.pad(D, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, k - kk)), constant_values=-1)
    return D, I.astype(np.int64)


def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, sizes differing by at most one."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    edges = np.linspace(0, n, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def merge_topk(Ds: Sequence[np.ndarray], Is: Sequence[np.ndarray], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (D, I) with global ids into the overall top-k (-1 ids sort last)."""
    D = np.concatenate(Ds, axis=1)  # (nq, shards·k)
    I = np.concatenate(Is, axis=1)  # (nq, shards·k)
    D = np.where(I < 0, -np.inf, D)
    order = np.lexsort((I, -D), axis=1)[:, :k] if D.shape[1] else np.zeros((len(D), 0), int)
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def search_shards(
    shards: Sequence[tuple[faiss.Index, int]],
    xq: np.ndarray,
    k: int,
    params: IndexParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Search every (index, offset) shard and merge: the in-process twin of the Serve fan-out."""
    Ds, Is = [], []
    for index, offset in shards:
        D, I = search_index(index, xq, k, params)
        Ds.append(D)
        Is.append(np.where(I >= 0, I + offset, -1))
    return merge_topk(Ds, Is, k)
