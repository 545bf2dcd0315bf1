"""Compaction: fold a live catalog's change log into a new index version (the body of
``data_jobs.compact_index``).

The catalog as of the log's last change S (the version's prepared catalog with changes
``log_position+1..S`` applied) is written as a prepared dataset beside the versions, and the
normal build (:func:`~retrieval_platform.index.build.build_version`, Ray Data embedding, fresh
BM25 statistics) makes a version of it with ``log_position`` S. Writes keep arriving meanwhile:
the new version's replicas replay the log after S when they load, so a swap to it
(:func:`~retrieval_platform.serving.control.swap_version`) carries every one of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pyarrow.parquet as pq

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.catalog.live import LiveCatalog
from retrieval_platform.catalog.schema import PREPARED_PRODUCT_SCHEMA
from retrieval_platform.config import from_dict
from retrieval_platform.encoder.batch import EmbedConfig
from retrieval_platform.index.build import BuildIndexConfig, build_version
from retrieval_platform.index.changelog import ChangeLog, log_location
from retrieval_platform.index.store import IndexManifest, load_manifest
from retrieval_platform.io import checksum_tree, write_json

log = logging.getLogger(__name__)
CATALOGS = "_catalogs"  # compacted catalogs, beside the versions and the log


@dataclass
class CompactConfig:
    index: str = "runs/indexes/synthetic"  # a version folder, or a root whose LATEST names one
    version: str | None = None  # the new version's name (default: a UTC timestamp)
    # the Serve application to swap to the new version once built (none: build only)
    swap_app: str | None = None
    embed: EmbedConfig | None = None  # default: the version's own


def compact(cfg: CompactConfig) -> IndexManifest:
    """Build the version of the catalog as of the log's last change (and swap to it)."""
    base = load_manifest(cfg.index)
    catalog = LiveCatalog.of_version(base)
    catalog.apply(list(ChangeLog(log_location(base.path)).read_after(base.log_position)))
    version = cfg.version or datetime.now(UTC).strftime("v%Y%m%d-%H%M%S")
    root = base.path.rstrip("/").rsplit("/", 1)[0]
    prepared = storage.join(root, CATALOGS, version)
    write_catalog(PreparedDataset(base.dataset.path), catalog, prepared)
    build = from_dict(BuildIndexConfig, base.config)
    build = replace(build, prepared_dir=prepared, output_root=root, version=version,
                    log_position=catalog.position, embed=cfg.embed or build.embed)
    manifest = build_version(build)
    log.info("compacted %s (log %d..%d) into %s", base.version, base.log_position + 1,
             catalog.position, manifest.version)
    if cfg.swap_app:
        from retrieval_platform.serving.control import swap_version

        swap_version(manifest.path, app_name=cfg.swap_app)
    return manifest


def write_catalog(source: PreparedDataset, catalog: LiveCatalog, location: str) -> None:
    """A prepared dataset at ``location``: ``catalog``'s products, ``source``'s queries and
    judgments (judgments of a deleted product are kept: evaluation counts them as misses)."""
    products = catalog.table().cast(PREPARED_PRODUCT_SCHEMA)
    with storage.publish(location, overwrite=False) as tmp:
        (tmp / "products").mkdir()
        pq.write_table(products, tmp / "products" / "part-00000.parquet")
        for kind in ("queries", "judgments"):
            (tmp / kind).mkdir()
            for f in sorted((source.path / kind).glob("*.parquet")):
                (tmp / kind / f.name).write_bytes(f.read_bytes())
        manifest = dict(source.manifest)
        manifest["counts"] = dict(manifest.get("counts") or {})
        manifest["compacted"] = {"from": source.location, "log_position": catalog.position,
                                 "products": products.num_rows}
        manifest["files"] = checksum_tree(tmp)
        write_json(tmp / "manifest.json", manifest)



