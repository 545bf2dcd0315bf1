"""What the benchmark scripts share: a local Ray on every core, and a generated catalog with
its index."""

from __future__ import annotations

import os
import tempfile

import ray

from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
from retrieval_platform.config import from_dict
from retrieval_platform.indexing import BuildIndexConfig, build_index_dir


def local_ray() -> int:
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    return cpus


def synthetic_catalog(products: int, prefix: str) -> str:
    """A prepared generated catalog in a new temporary folder; returns the folder."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    prepare_catalog(from_dict(PrepareConfig, {"source": {"num_products": products},
                                              "output_dir": f"{tmp}/data"}))
    return tmp


def synthetic_index(tmp: str, model: str, *, bm25: bool = True, num_shards: int = 2) -> str:
    """An index of the catalog in ``tmp`` built with ``model``; returns the version folder."""
    return build_index_dir(from_dict(BuildIndexConfig, {
        "prepared_dir": f"{tmp}/data", "model": model, "output_root": f"{tmp}/indexes",
        "num_shards": num_shards, "bm25": bm25}))["path"]
