"""Building an index version (the body of ``data_jobs.build_index``): embed the prepared
catalog with the model (Ray Data), shard it into FAISS indexes, index BM25, and publish the
folder whose format :mod:`retrieval_platform.index.store` defines, atomically."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import to_dict
from retrieval_platform.encoder.batch import (
    EmbedConfig,
    embed_catalog,
    vector_column,
    vectors_of,
)
from retrieval_platform.encoder.model import model_info, model_location, resolve_model_folder
from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.index.faiss_ops import (
    IndexParams,
    build_faiss_index,
    first_dims,
    shard_bounds,
)
from retrieval_platform.index.store import (
    FORMAT_VERSION,
    META_COLUMNS,
    META_SCHEMA,
    DatasetRef,
    IndexLoadError,
    IndexManifest,
    ModelRef,
    ShardEntry,
    load_manifest,
    write_shard,
)
from retrieval_platform.io import sha256_file, write_json
from retrieval_platform.retrievers.hybrid import Fusion

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings/part-00000.parquet"  # every product's full vector, catalog order


@dataclass
class BuildIndexConfig:
    prepared_dir: str = "runs/data/synthetic"
    model: str = "runs/models/synthetic-stage2"  # model folder or backbone name (zero-shot)
    output_root: str = "runs/indexes/synthetic"
    version: str | None = None  # default: a UTC timestamp
    # "auto": from the corpus size and the cluster's cores (``auto_num_shards``)
    num_shards: int | Literal["auto"] = 2
    params: IndexParams = field(default_factory=IndexParams)
    bm25: bool = True  # also index the catalog for lexical and hybrid requests
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    # Matryoshka: index (and encode queries with) the first `dim` dimensions; null: all of them
    dim: int | None = None
    # how hybrid requests fuse the dense and BM25 lists (evaluation picks it on dev)
    fusion: Fusion = field(default_factory=Fusion)
    # the last change of the catalog's change log the prepared catalog contains (compaction
    # sets it); the version's replicas replay the log after it
    log_position: int = 0
    # an earlier version's folder whose stored vectors of the same model and catalog are
    # reused instead of embedding again (a new shard count or ANN index, not a new model)
    embeddings_from: str | None = None


def build_version(cfg: BuildIndexConfig) -> IndexManifest:
    """Embed the prepared catalog with Ray Data and publish a new index version; its manifest
    (``path``: where it now lives)."""
    started = time.perf_counter()
    ds = PreparedDataset(cfg.prepared_dir)
    folder = resolve_model_folder(cfg.model)
    info = model_info(folder)
    version = cfg.version or datetime.now(UTC).strftime("v%Y%m%d-%H%M%S")
    target = storage.join(cfg.output_root, version)
    with storage.publish(target, overwrite=False) as tmp:
        if cfg.embeddings_from:
            cols, xb = _stored_embeddings(ds, cfg.embeddings_from, info["model_id"])
        else:
            cols, xb = embed_catalog(
                ds.products_dataset(["product_id", "text", *META_COLUMNS[1:]]), cfg.model,
                cfg.embed, [*META_COLUMNS, "text"])
        (tmp / "embeddings").mkdir()  # written here: this folder exists on this node only
        pq.write_table(pa.table({"product_id": cols["product_id"],
                                 "embedding": vector_column(xb)}), tmp / EMBEDDINGS_FILE)
        if xb.shape[1] != info["dim"]:
            raise IndexLoadError(f"model {folder} gives {xb.shape[1]}-d vectors, "
                                 f"its manifest says {info['dim']}")
        xb = first_dims(xb, cfg.dim)  # (n, index dim)
        shards = _write_shards(tmp, xb, cols, cfg)
        bm25_files = {}
        if cfg.bm25:
            BM25Retriever(cols["product_id"], cols["text"]).save(tmp / "bm25")
            bm25_files = {p.name: sha256_file(p) for p in sorted((tmp / "bm25").iterdir())}
        manifest = IndexManifest(
            format_version=FORMAT_VERSION, version=version,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            model=ModelRef(path=model_location(cfg.model), model_id=info["model_id"],
                           dim=info["dim"], weights_sha256=info["weights_sha256"]),
            dataset=DatasetRef(path=ds.location, grade_scale=ds.scale.name),
            metric="inner_product", dim=int(xb.shape[1]), params=cfg.params,
            num_products=len(xb), shards=shards, bm25=bm25_files, fusion=cfg.fusion,
            config=to_dict(cfg), wall_seconds=round(time.perf_counter() - started, 2),
            log_position=cfg.log_position)
        write_json(tmp / "manifest.json", manifest.to_json())
    storage.write_text(storage.join(cfg.output_root, "LATEST"), version + "\n")
    manifest.path = storage.canonical(target)
    log.info("index %s: %d products in %d shards (%.0fs)", target, len(xb), len(shards),
             manifest.wall_seconds)
    return manifest


def auto_num_shards(n: int, cpus: int, exact: bool) -> int:
    """Shards for ``n`` vectors on a cluster of ``cpus`` cores: as few as hold the vectors.

    A shard is a unit of memory and of parallel search, and its fan-out costs a hop and a
    merge per query (~5 ms measured, docs/BENCHMARKS.md). An exact (flat) shard is split once
    its one-core search nears that cost several times over (500k vectors of 384 d: ~20 ms);
    an ANN shard's search grows like log n, so it is split for memory only (5M vectors). More
    shards than cores buy fan-out cost, not parallelism."""
    per_shard = 500_000 if exact else 5_000_000
    return max(1, min(math.ceil(n / per_shard), max(cpus, 1)))


def _stored_embeddings(ds: PreparedDataset, source: str, model_id: str
                       ) -> tuple[dict[str, list], np.ndarray]:
    """The catalog's columns and the vectors an earlier version stored for it, in catalog
    order; refused where that version's model differs or a product has no stored vector."""
    old = load_manifest(source)
    if old.model.model_id != model_id:
        raise IndexLoadError(f"embeddings_from {source}: built with model {old.model.model_id}, "
                             f"this build's model is {model_id}")
    stored = pq.read_table(storage.fetch(old.path, [EMBEDDINGS_FILE]) / EMBEDDINGS_FILE)
    row_of = {p: i for i, p in enumerate(stored["product_id"].to_pylist())}
    products = ds.products(["product_id", "text", *META_COLUMNS[1:]])
    ids = products["product_id"].to_pylist()
    missing = [p for p in ids if p not in row_of]
    if missing:
        raise IndexLoadError(f"embeddings_from {source}: {len(missing)} products of "
                             f"{ds.location} have no stored vector (first: {missing[0]!r}); "
                             "embed again")
    vectors = vectors_of(stored["embedding"])  # (n stored, d)
    xb = np.ascontiguousarray(vectors[[row_of[p] for p in ids]])  # (n, d)
    return {c: products[c].to_pylist() for c in [*META_COLUMNS, "text"]}, xb


def _write_shards(folder: Path, xb: np.ndarray, cols: dict[str, list],
                  cfg: BuildIndexConfig) -> list[ShardEntry]:
    """``cfg.num_shards`` contiguous shards of the (n, d) vectors ``xb``, each with the
    metadata of its rows."""
    num_shards = cfg.num_shards
    if num_shards == "auto":
        exact = (cfg.params.factory or cfg.params.kind).lower() == "flat"
        num_shards = auto_num_shards(len(xb), int(ray.cluster_resources().get("CPU", 1))
                                     if ray.is_initialized() else os.cpu_count() or 1, exact)
    shards = []
    for i, (start, stop) in enumerate(shard_bounds(len(xb), num_shards)):
        index = build_faiss_index(xb[start:stop], cfg.params, seed=i)
        meta = pa.table({"row": pa.array(np.arange(start, stop), pa.int64()),
                         **{c: cols[c][start:stop] for c in META_COLUMNS}}, schema=META_SCHEMA)
        shards.append(write_shard(folder, i, index, meta, (start, stop)))
    return shards
