"""Shared fixtures: one local Ray instance for the whole session (2 CPUs, like CI)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# An empty backbone/model cache per test session: a cache left on the machine (a converted
# SmolLM2, say) must never stand in for what a fresh install builds.
os.environ["RETRIEVAL_PLATFORM_CACHE"] = tempfile.mkdtemp(prefix="rp-test-cache-")
# Runs are tracked in a store of the session's own, not in the checkout's runs/.
os.environ["MLFLOW_TRACKING_URI"] = (
    f"sqlite:///{tempfile.mkdtemp(prefix='rp-test-mlflow-')}/mlflow.db")

REPO = Path(__file__).resolve().parents[1]
HOMEDEPOT = Path(os.environ.get("HOMEDEPOT_DIR", REPO.parent / "shared" / "data" / "homedepot"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, with its dashboard (job API, state API) on loopback."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                 logging_level="WARNING", log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def homedepot_dir() -> Path:
    if not (HOMEDEPOT / "products.csv").is_file():
        pytest.skip(f"Home Depot data not found at {HOMEDEPOT} (set HOMEDEPOT_DIR)")
    return HOMEDEPOT
