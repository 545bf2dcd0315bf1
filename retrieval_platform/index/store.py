"""The versioned index folder: embeddings, FAISS shards, per-shard product metadata, a BM25
index for hybrid search, and a manifest that ties them to one model.

    <root>/<version>/
        manifest.json            model id and dim, counts, shard files with sha256, parameters
        embeddings/*.parquet     product_id + embedding (Ray Data embeds, the driver writes)
        shard_000.faiss          FAISS index of rows [start, stop)
        shard_000.parquet        row, product_id, title, category, price of those rows
        bm25/                    bm25s index over all products (npy + json, no pickle)
    <root>/LATEST                name of the newest version

A version is written (by :mod:`retrieval_platform.indexing`) to a temporary folder and published
as a whole (:func:`retrieval_platform.storage.publish`): renamed into place, or uploaded to a
storage URI with its checksums written last. Each Serve replica downloads only the files it
serves into its node's cache (:func:`local_files`). Loading a shard checks its files against
the manifest (sha256, dimension, count) and refuses a corrupted or mismatched one with
:class:`IndexLoadError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval_platform import storage
from retrieval_platform.errors import PlatformError
from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.index.faiss_ops import IndexParams, search_index
from retrieval_platform.io import read_json, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_COLUMNS = ["product_id", "title", "category", "price"]


class IndexLoadError(PlatformError):
    """An index folder is missing, corrupted, or does not match its manifest or model."""


def resolve_index_dir(path: str | Path) -> str:
    """Where a version lives (an absolute path or a storage URI), given its folder or a root
    whose LATEST names one."""
    if storage.exists(storage.join(path, "manifest.json")):
        return storage.canonical(path)
    latest = storage.join(path, "LATEST")
    if storage.exists(latest):
        return storage.canonical(storage.join(path, storage.read_text(latest).strip()))
    raise IndexLoadError(f"{path}: not an index version folder (no manifest.json) nor a root "
                         "with a LATEST file; run data_jobs.build_index")


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a version, with ``path``: where the version lives (the name every node
    loads it by)."""
    location = resolve_index_dir(path)
    try:
        manifest = read_json(storage.fetch(location, ["manifest.json"]) / "manifest.json")
    except ValueError as exc:
        raise IndexLoadError(f"{location}/manifest.json is not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexLoadError(f"{location}: unsupported index format "
                             f"{manifest.get('format_version')}")
    manifest["path"] = location
    return manifest


def local_files(manifest: dict[str, Any], names: list[str]) -> Path:
    """This node's folder holding ``names`` of the version (downloaded where it is remote)."""
    return storage.fetch(manifest["path"], ["manifest.json", *names])


def _check_file(folder: Path, name: str, expected: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise IndexLoadError(f"{path}: missing")
    if sha256_file(path) != expected:
        raise IndexLoadError(f"{path}: sha256 does not match the manifest (corrupted or altered)")
    return path


@dataclass
class LoadedShard:
    """One shard, ready to search: the FAISS index and the metadata of its rows."""

    shard_id: int
    index: faiss.Index
    meta: pa.Table  # row, product_id, title, category, price
    params: IndexParams
    version: str
    model_id: str

    @property
    def offset(self) -> int:
        return int(self.meta["row"][0].as_py()) if self.meta.num_rows else 0

    def allowed(self, filters: CatalogFilter | None) -> np.ndarray | None:
        return None if filters is None or filters.empty else filters.mask(self.meta)

    def search(self, xq: np.ndarray, k: int, filters: CatalogFilter | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) with I global rows (-1: no result)."""
        D, I = search_index(self.index, xq, k, self.params, self.allowed(filters))
        return D, np.where(I >= 0, I + self.offset, -1)

    def rows(self, global_rows: list[int]) -> list[dict[str, Any]]:
        local = pa.array([r - self.offset for r in global_rows], pa.int64())
        return self.meta.take(local).to_pylist()


def load_shard(path: str | Path, shard_id: int, expected_model_id: str | None = None
               ) -> LoadedShard:
    manifest = load_manifest(path)
    if expected_model_id and manifest["model"]["model_id"] != expected_model_id:
        raise IndexLoadError(f"{manifest['path']}: built with model "
                             f"{manifest['model']['model_id']}, not {expected_model_id}")
    try:
        entry = manifest["shards"][shard_id]
    except IndexError:
        raise IndexLoadError(f"{manifest['path']}: no shard {shard_id} "
                             f"(the manifest lists {len(manifest['shards'])})") from None
    folder = local_files(manifest, [entry["faiss"], entry["meta"]])
    faiss_path = _check_file(folder, entry["faiss"], entry["sha256"]["faiss"])
    meta_path = _check_file(folder, entry["meta"], entry["sha256"]["meta"])
    index = faiss.read_index(str(faiss_path))
    meta = pq.read_table(meta_path)
    dim = manifest.get("dim", manifest["model"]["dim"])  # older manifests: the model's
    if index.d != dim:
        raise IndexLoadError(f"{faiss_path}: dimension {index.d}, manifest says {dim}")
    if index.ntotal != entry["count"] or meta.num_rows != entry["count"]:
        raise IndexLoadError(f"{faiss_path}: {index.ntotal} vectors and {meta.num_rows} metadata "
                             f"rows, manifest says {entry['count']}")
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return LoadedShard(shard_id, index, meta, IndexParams(**manifest["params"]),
                       manifest["version"], manifest["model"]["model_id"])


def load_bm25(path: str | Path) -> tuple[BM25Retriever, pa.Table]:
    """The catalog-wide BM25 index and the metadata of every row (for filters and titles)."""
    manifest = load_manifest(path)
    if not manifest.get("bm25"):
        raise IndexLoadError(f"{manifest['path']}: built without bm25 (set bm25: true to build "
                             "it)")
    folder = local_files(manifest, [*(f"bm25/{name}" for name in manifest["bm25"]),
                                    *(s["meta"] for s in manifest["shards"])])
    for name, digest in manifest["bm25"].items():
        _check_file(folder / "bm25", name, digest)
    metas = [pq.read_table(_check_file(folder, s["meta"], s["sha256"]["meta"]))
             for s in manifest["shards"]]
    return BM25Retriever.load(folder / "bm25"), pa.concat_tables(metas)


@dataclass(frozen=True)
class CatalogFilter:
    """Request filters: category path prefix (case-insensitive) and a price range."""

    category: str | None = None
    price_min: float | None = None
    price_max: float | None = None

    @property
    def empty(self) -> bool:
        return self.category is None and self.price_min is None and self.price_max is None

    def mask(self, meta: pa.Table) -> np.ndarray:
        keep = pa.array(np.ones(meta.num_rows, dtype=bool))
        if self.category is not None:
            cat = pc.utf8_lower(pc.fill_null(meta["category"], ""))
            keep = pc.and_(keep, pc.starts_with(cat, self.category.lower()))
        if self.price_min is not None:
            keep = pc.and_(keep, pc.fill_null(pc.greater_equal(meta["price"], self.price_min),
                                              False))
        if self.price_max is not None:
            keep = pc.and_(keep, pc.fill_null(pc.less_equal(meta["price"], self.price_max),
                                              False))
        return np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
