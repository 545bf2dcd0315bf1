"""The versioned index folder: embeddings, FAISS shards, per-shard product metadata, a BM25
index for hybrid search, and a manifest that ties them to one model.

    <root>/<version>/
        manifest.json            model id and dim, counts, shard files with sha256, parameters
        embeddings/*.parquet     product_id + embedding (Ray Data embeds, the driver writes)
        shard_000.faiss          FAISS index of rows [start, stop)
        shard_000.parquet        row, product_id, title, category, price of those rows
        bm25/                    bm25s index over all products (npy + json, no pickle)
    <root>/LATEST                name of the newest version

The format lives in this file: the manifest's types (:class:`IndexManifest`, one
:class:`ShardEntry` a shard, the :class:`ModelRef` it was built with), :func:`write_shard` and
:func:`load_shard`. A version is written (by :mod:`retrieval_platform.index.build`) to a
temporary folder and published as a whole (:func:`retrieval_platform.storage.publish`): renamed
into place, or uploaded to a storage URI with its checksums written last. Each Serve replica
downloads only the files it serves into its node's cache (:func:`local_files`). Loading a shard
checks its files against the manifest (sha256, dimension, count) and refuses a corrupted or
mismatched one with :class:`IndexLoadError`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval_platform import storage
from retrieval_platform.config import ConfigError, from_dict
from retrieval_platform.errors import PlatformError
from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.index.faiss_ops import IndexParams, search_index
from retrieval_platform.io import read_json, sha256_file
from retrieval_platform.retrievers.hybrid import Fusion

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_COLUMNS = ["product_id", "title", "category", "price", "in_stock"]
META_SCHEMA = pa.schema([("row", pa.int64()), ("product_id", pa.string()),
                         ("title", pa.string()), ("category", pa.string()),
                         ("price", pa.float64()), ("in_stock", pa.bool_())])


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


@dataclass(frozen=True)
class ModelRef:
    """The model a version was built with: where every node resolves it, and its identity."""

    path: str  # a model folder, storage URI or backbone name (encoder.model.model_location)
    model_id: str
    dim: int  # the model's dimension (the index's may be a Matryoshka prefix of it)
    weights_sha256: str


@dataclass(frozen=True)
class ShardEntry:
    """One shard's files: the FAISS index of rows [start, stop) and their product metadata."""

    id: int
    rows: list[int]  # [start, stop) of the catalog's rows
    count: int
    faiss: str
    meta: str
    sha256: dict[str, str]  # "faiss" and "meta" -> the file's sha256

    @property
    def files(self) -> list[str]:
        return [self.faiss, self.meta]


@dataclass(frozen=True)
class DatasetRef:
    path: str  # the prepared catalog
    grade_scale: str


@dataclass
class IndexManifest:
    """``manifest.json`` of a version, typed; :func:`load_manifest` reads it (with ``path``,
    where the version lives: the name every node loads it by), :meth:`to_json` writes it."""

    format_version: int
    version: str
    created_at: str
    model: ModelRef
    dataset: DatasetRef
    metric: str
    dim: int  # the index's dimension (a Matryoshka prefix of the model's if smaller)
    params: IndexParams
    num_products: int
    shards: list[ShardEntry]
    bm25: dict[str, str]  # file name under bm25/ -> sha256; empty: built without BM25
    fusion: Fusion  # how hybrid requests fuse dense and BM25 (chosen on dev)
    config: dict[str, Any]  # the build config, as given
    wall_seconds: float
    # the last change of the catalog's change log this version contains (0: none; a compacted
    # version folds changes 1..log_position in); replicas replay the log after it
    log_position: int = 0
    path: str = field(default="", compare=False)  # not written: set where it is read

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = "") -> IndexManifest:
        """A manifest as written, checked key by key (older versions: the model's dimension,
        RRF fusion)."""
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexLoadError(f"{path or 'manifest'}: unsupported index format "
                                 f"{data.get('format_version')}")
        data = dict(data)
        data.setdefault("dim", (data.get("model") or {}).get("dim"))
        data["fusion"] = data.get("fusion") or {}
        data.pop("path", None)
        try:
            manifest = from_dict(cls, data, "manifest")
        except ConfigError as exc:
            raise IndexLoadError(f"{path}/manifest.json: {exc}") from None
        manifest.path = path
        return manifest

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}

    @property
    def served_dim(self) -> int | None:
        """The prefix queries are encoded at: the index's dimension where it is smaller than
        the model's, else None (the full vector)."""
        return self.dim if self.dim < self.model.dim else None


def load_manifest(path: str | Path) -> IndexManifest:
    """The manifest of a version (given its folder or a root whose LATEST names one)."""
    location = resolve_index_dir(path)
    try:
        data = read_json(storage.fetch(location, ["manifest.json"]) / "manifest.json")
    except ValueError as exc:
        raise IndexLoadError(f"{location}/manifest.json is not valid JSON ({exc})") from None
    return IndexManifest.from_json(data, location)


def local_files(manifest: IndexManifest, names: list[str]) -> Path:
    """This node's folder holding ``names`` of the version (downloaded where it is remote)."""
    return storage.fetch(manifest.path, ["manifest.json", *names])


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


def write_shard(folder: Path, shard_id: int, index: faiss.Index, meta: pa.Table,
                rows: tuple[int, int]) -> ShardEntry:
    """Write shard ``shard_id`` (its FAISS index and the metadata of rows [start, stop)) into
    ``folder``; the manifest's entry for it."""
    faiss_name, meta_name = f"shard_{shard_id:03d}.faiss", f"shard_{shard_id:03d}.parquet"
    faiss.write_index(index, str(folder / faiss_name))
    pq.write_table(meta, folder / meta_name)
    start, stop = rows
    return ShardEntry(id=shard_id, rows=[start, stop], count=stop - start, faiss=faiss_name,
                      meta=meta_name, sha256={"faiss": sha256_file(folder / faiss_name),
                                              "meta": sha256_file(folder / meta_name)})


def load_shard(path: str | Path, shard_id: int, expected_model_id: str | None = None
               ) -> LoadedShard:
    manifest = load_manifest(path)
    if expected_model_id and manifest.model.model_id != expected_model_id:
        raise IndexLoadError(f"{manifest.path}: built with model {manifest.model.model_id}, "
                             f"not {expected_model_id}")
    if not 0 <= shard_id < len(manifest.shards):
        raise IndexLoadError(f"{manifest.path}: no shard {shard_id} "
                             f"(the manifest lists {len(manifest.shards)})")
    entry = manifest.shards[shard_id]
    folder = local_files(manifest, entry.files)
    faiss_path = _check_file(folder, entry.faiss, entry.sha256["faiss"])
    meta_path = _check_file(folder, entry.meta, entry.sha256["meta"])
    index = faiss.read_index(str(faiss_path))
    meta = pq.read_table(meta_path)
    if index.d != manifest.dim:
        raise IndexLoadError(f"{faiss_path}: dimension {index.d}, manifest says {manifest.dim}")
    if index.ntotal != entry.count or meta.num_rows != entry.count:
        raise IndexLoadError(f"{faiss_path}: {index.ntotal} vectors and {meta.num_rows} metadata "
                             f"rows, manifest says {entry.count}")
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return LoadedShard(shard_id, index, meta, manifest.params, manifest.version,
                       manifest.model.model_id)


def load_bm25(path: str | Path) -> tuple[BM25Retriever, pa.Table]:
    """The catalog-wide BM25 index and the metadata of every row (for filters and titles)."""
    manifest = load_manifest(path)
    if not manifest.bm25:
        raise IndexLoadError(f"{manifest.path}: built without bm25 (set bm25: true to build it)")
    folder = local_files(manifest, [*(f"bm25/{name}" for name in manifest.bm25),
                                    *(s.meta for s in manifest.shards)])
    for name, digest in manifest.bm25.items():
        _check_file(folder / "bm25", name, digest)
    metas = [pq.read_table(_check_file(folder, s.meta, s.sha256["meta"]))
             for s in manifest.shards]
    # permissive: a shard whose in_stock is all unknown may have been written as nulls
    return BM25Retriever.load(folder / "bm25"), pa.concat_tables(metas,
                                                                 promote_options="permissive")


@dataclass(frozen=True)
class CatalogFilter:
    """Request filters: category path prefix (case-insensitive), a price range, in stock."""

    category: str | None = None
    price_min: float | None = None
    price_max: float | None = None
    in_stock: bool | None = None  # true: not marked out of stock (unknown counts as in stock)

    @property
    def empty(self) -> bool:
        return (self.category is None and self.price_min is None and self.price_max is None
                and self.in_stock is None)

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
        if self.in_stock is not None:
            stock = (pc.fill_null(meta["in_stock"], True) if "in_stock" in meta.column_names
                     else pa.array(np.ones(meta.num_rows, dtype=bool)))
            keep = pc.and_(keep, stock if self.in_stock else pc.invert(stock))
        return np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)
