"""Search logic shared by the Serve deployments and the in-process :class:`LocalSearcher`
(tests and benchmarks compare the two, so they must run the same code): per-shard hits with
metadata, their merge, BM25 hits, and the one mode dispatch (:func:`candidate_depth`,
:func:`combine`) both use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval_platform.encoder.model import (
    DualEncoder,
    Kind,
    Precision,
    Runtime,
    model_info,
    resolve_model_folder,
)
from retrieval_platform.index.faiss_ops import merge_topk
from retrieval_platform.index.live import LiveShard, load_live_lexical, load_live_shard
from retrieval_platform.index.store import (
    CatalogFilter,
    IndexLoadError,
    LoadedShard,
    load_manifest,
)
from retrieval_platform.retrievers.hybrid import HYBRID_DEPTH, Fusion, fuse

HitRecord = dict[str, Any]  # product_id, title, score, shard, category, price, row
Mode = Literal["dense", "lexical", "hybrid"]


@dataclass
class IndexEncoder:
    """The query encoder of one index version: its model, at its index's dimension."""

    model: DualEncoder
    dim: int | None  # a Matryoshka prefix when the index is smaller than the model
    # how the version's build embedded its products: live upserts are embedded alike, so a
    # written product's vector is the one a rebuild gives it
    product_precision: Precision = "fp32"
    product_batch_size: int = 64
    product_runtime: Runtime = "torch"

    def encode(self, texts: list[str], kind: Kind = "query", precision: Precision = "fp32",
               batch_size: int = 64, runtime: Runtime = "torch") -> np.ndarray:
        return self.model.encode(texts, kind, batch_size=batch_size, precision=precision,
                                 dim=self.dim, runtime=runtime)

    def encode_products(self, texts: list[str]) -> np.ndarray:
        """(n, d) product vectors as the index build embeds them."""
        return self.encode(texts, "product", self.product_precision, self.product_batch_size,
                           self.product_runtime)


def load_encoder_for(index_dir: str | Path, device: str = "cpu") -> IndexEncoder:
    """The model an index was built with, checked against the index manifest, on ``device``."""
    manifest = load_manifest(index_dir)
    folder = resolve_model_folder(manifest.model.path)  # on this replica's node
    info = model_info(folder)
    if info["model_id"] != manifest.model.model_id:
        raise IndexLoadError(f"{index_dir}: built with {manifest.model.model_id}, but "
                             f"{folder} now holds {info['model_id']}")
    embed = manifest.config.get("embed") or {}
    return IndexEncoder(DualEncoder.from_pretrained(folder).to(device), manifest.served_dim,
                        embed.get("precision", "fp32"), embed.get("encode_batch_size", 64),
                        embed.get("runtime", "torch"))


def to_filter(filters: dict[str, Any] | None) -> CatalogFilter | None:
    return CatalogFilter(**filters) if filters else None


def shard_hits(shard: LoadedShard | LiveShard, xq: np.ndarray, k: int,
               filters: CatalogFilter | None) -> list[HitRecord]:
    """Top-k of one shard for one query vector (1, d), with product metadata."""
    return shard_hits_many(shard, xq, k, [filters])[0]


def shard_hits_many(shard: LoadedShard | LiveShard, xq: np.ndarray, k: int,
                    filters: list[CatalogFilter | None]) -> list[list[HitRecord]]:
    """Top-k of one shard for each query vector of ``xq`` (n, d) under its own filters; the
    unfiltered ones are searched as one FAISS batch."""
    out: list[list[HitRecord] | None] = [None] * len(filters)
    plain = [i for i, f in enumerate(filters) if f is None or f.empty]
    if plain:
        D, I = shard.search(xq[plain], k, None)  # (len(plain), k)
        for row, i in enumerate(plain):
            out[i] = _with_metadata(shard, D[row], I[row])
    for i, f in enumerate(filters):
        if out[i] is None:
            D, I = shard.search(xq[i : i + 1], k, f)  # (1, k)
            out[i] = _with_metadata(shard, D[0], I[0])
    return out  # type: ignore[return-value]


def _with_metadata(shard: LoadedShard | LiveShard, D: np.ndarray, I: np.ndarray) -> list[HitRecord]:
    rows = [int(i) for i in I if i >= 0]
    metas = shard.rows(rows)
    return [{"product_id": m["product_id"], "title": m["title"], "score": float(d),
             "shard": shard.shard_id, "category": m["category"], "price": m["price"],
             "in_stock": m.get("in_stock"), "row": r}
            for d, r, m in zip(D, rows, metas, strict=False)]


def merge_hits(per_shard: list[list[HitRecord]], k: int) -> list[HitRecord]:
    """Global top-k of per-shard hits (the same order as one flat index)."""
    if not per_shard:
        return []
    by_row = {h["row"]: h for hits in per_shard for h in hits}
    width = max((len(h) for h in per_shard), default=0)
    if width == 0:
        return []
    Ds = [np.array([[h["score"] for h in hits] + [-np.inf] * (width - len(hits))])
          for hits in per_shard]
    Is = [np.array([[h["row"] for h in hits] + [-1] * (width - len(hits))]) for hits in per_shard]
    _, I = merge_topk(Ds, Is, k)
    return [by_row[int(i)] for i in I[0] if i >= 0]


def fuse_hits(dense: list[HitRecord], lexical: list[HitRecord], k: int,
              fusion: Fusion | None = None) -> list[HitRecord]:
    """Hybrid: the index's fusion (``retrievers.hybrid.fuse``, RRF by default) of the dense and
    lexical lists; score = the fused score."""
    first = {h["product_id"]: h for h in lexical} | {h["product_id"]: h for h in dense}
    fused = fuse([(h["product_id"], h["score"]) for h in dense],
                 [(h["product_id"], h["score"]) for h in lexical], k, fusion)
    return [first[p] | {"score": score} for p, score in fused]


def uses_dense(mode: Mode) -> bool:
    return mode in ("dense", "hybrid")


def uses_lexical(mode: Mode) -> bool:
    return mode in ("lexical", "hybrid")


def candidate_depth(mode: Mode, k: int) -> int:
    """How many hits each part of a ``mode`` request retrieves: a hybrid answer fuses the top
    ``HYBRID_DEPTH`` of each side, as evaluation does (``evaluation.run``)."""
    return k if mode == "dense" else max(k, HYBRID_DEPTH)


def combine(mode: Mode, dense: list[HitRecord], lexical: list[HitRecord], k: int,
            fusion: Fusion) -> list[HitRecord]:
    """The answer of a ``mode`` request from its parts (each retrieved to
    :func:`candidate_depth`)."""
    if mode == "dense":
        return dense[:k]
    if mode == "lexical":
        return lexical[:k]
    return fuse_hits(dense, lexical, k, fusion)


class LocalSearcher:
    """Everything one version of the service does, in one process, with its catalog's change
    log applied (:meth:`refresh` applies what was written since): for tests and benchmarks."""

    def __init__(self, index_dir: str | Path) -> None:
        self.manifest = load_manifest(index_dir)
        self.encoder = load_encoder_for(index_dir)
        path = self.manifest.path
        loaded = [load_live_shard(path, s.id) for s in self.manifest.shards]
        self.shards = [shard for shard, _ in loaded]
        self.log = loaded[0][1]
        self.lexical = load_live_lexical(path)[0] if self.manifest.bm25 else None
        self.refresh()

    def refresh(self) -> int:
        """Apply the changes logged since; the log position now applied."""
        changes = list(self.log.read_after(self.position))
        for part in [*self.shards, *([self.lexical] if self.lexical else [])]:
            part.apply(changes)
        return self.position

    @property
    def position(self) -> int:
        return min(s.position for s in self.shards)

    def search(self, query: str, k: int = 10, mode: Mode = "dense",
               filters: dict[str, Any] | None = None) -> list[HitRecord]:
        f = to_filter(filters)
        dense: list[HitRecord] = []
        lexical: list[HitRecord] = []
        depth = candidate_depth(mode, k)
        if uses_dense(mode):
            xq = self.encoder.encode([query], "query")
            dense = merge_hits([shard_hits(s, xq, depth, f) for s in self.shards], depth)
        if uses_lexical(mode):
            if self.lexical is None:
                raise IndexLoadError("this index was built without bm25")
            lexical = self.lexical.search(query, depth, f)
        return combine(mode, dense, lexical, k, self.manifest.fusion)
