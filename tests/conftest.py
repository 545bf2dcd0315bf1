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

from tests.helpers import HOMEDEPOT, free_port


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, with its dashboard (job API, state API) on loopback."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=free_port(),
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto) on 127.0.0.1 with one bucket; yields the environment
    that points pyarrow (and so the platform and Ray Train) at it."""
    import shutil
    import subprocess
    import sys
    import time

    import httpx
    from pyarrow import fs

    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.fail("moto_server is not installed (pip install -e '.[test]')")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("rp-test")
    yield env | {"bucket": "rp-test"}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc.terminate()
    proc.wait(timeout=10)
