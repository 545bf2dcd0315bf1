"""What the benchmark scripts share: a local Ray on every core, a generated catalog with its
index, and the tests' fault injection on the import path."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import ray

# The fault benchmarks inject faults with the tests' helpers (tests/chaos.py): the repository
# root on the path makes them importable from a script in bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
from retrieval_platform.config import from_dict
from retrieval_platform.index.build import BuildIndexConfig, build_version


def local_ray() -> int:
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    return cpus


def direct_ingress_url() -> str | None:
    """The first ingress replica's own HTTP server where this environment starts Ray with Serve's
    direct ingress (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` or ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``,
    read when Ray starts); None otherwise."""
    if "1" not in (os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"),
                   os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS")):
        return None
    return f"http://127.0.0.1:{os.environ.get('RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT', 30000)}"


def synthetic_catalog(products: int, prefix: str) -> str:
    """A prepared generated catalog in a new temporary folder; returns the folder."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    prepare_catalog(from_dict(PrepareConfig, {"source": {"num_products": products},
                                              "output_dir": f"{tmp}/data"}))
    return tmp


def synthetic_index(tmp: str, model: str, *, bm25: bool = True, num_shards: int = 2) -> str:
    """An index of the catalog in ``tmp`` built with ``model``; returns the version folder."""
    return build_version(from_dict(BuildIndexConfig, {
        "prepared_dir": f"{tmp}/data", "model": model, "output_root": f"{tmp}/indexes",
        "num_shards": num_shards, "bm25": bm25})).path
