"""Building an index version (the body of ``data_jobs.build_index``): embed the prepared
catalog with the model (Ray Data), shard it into FAISS indexes, index BM25, and publish the
folder whose format :mod:`retrieval_platform.index.store` defines, atomically."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import to_dict
from retrieval_platform.encoder.batch import EmbedConfig, embed_catalog, vector_column
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
    write_shard,
)
from retrieval_platform.io import sha256_file, write_json
from retrieval_platform.retrievers.hybrid import Fusion

log = logging.getLogger(__name__)


@dataclass
class BuildIndexConfig:
    prepared_dir: str = "runs/data/synthetic"
    model: str = "runs/models/synthetic-stage2"  # model folder or backbone name (zero-shot)
    output_root: str = "runs/indexes/synthetic"
    version: str | None = None  # default: a UTC timestamp
    num_shards: int = 2
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
        cols, xb = embed_catalog(ds.products_dataset(["product_id", "text", *META_COLUMNS[1:]]),
                                 cfg.model, cfg.embed, [*META_COLUMNS, "text"])
        (tmp / "embeddings").mkdir()  # written here: this folder exists on this node only
        pq.write_table(pa.table({"product_id": cols["product_id"],
                                 "embedding": vector_column(xb)}),
                       tmp / "embeddings" / "part-00000.parquet")
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


def _write_shards(folder: Path, xb: np.ndarray, cols: dict[str, list],
                  cfg: BuildIndexConfig) -> list[ShardEntry]:
    """``cfg.num_shards`` contiguous shards of the (n, d) vectors ``xb``, each with the
    metadata of its rows."""
    shards = []
    for i, (start, stop) in enumerate(shard_bounds(len(xb), cfg.num_shards)):
        index = build_faiss_index(xb[start:stop], cfg.params, seed=i)
        meta = pa.table({"row": pa.array(np.arange(start, stop), pa.int64()),
                         **{c: cols[c][start:stop] for c in META_COLUMNS}}, schema=META_SCHEMA)
        shards.append(write_shard(folder, i, index, meta, (start, stop)))
    return shards
