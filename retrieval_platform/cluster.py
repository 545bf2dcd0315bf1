"""The Ray cluster as jobs, the pipeline and the CLI meet it: is one there (or only something
else, or one that refuses our token), starting a local one the way a new user's machine needs,
and the resources it has."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from retrieval_platform.errors import PlatformError


@dataclass
class ClusterConfig:
    address: str = "http://127.0.0.1:8265"  # the dashboard / job API
    # the cluster's GCS, for deploying Serve (the pipeline then runs on a node of the cluster:
    # the head, or a laptop inside its network); "auto": the cluster started on this machine
    gcs_address: str = "auto"
    start_local: bool = True  # start `ray start --head` here when nothing answers there
    num_cpus: int | None = None
    dashboard_port: int = 8265
    # the interpreter of the cluster's nodes; null: this one (a cluster on this machine)
    python: str | None = None
    # shipped with every job (code and configs); none of it depends on this machine's folders
    working_dir: str = "."
    excludes: list[str] = field(default_factory=lambda: [
        ".git/", ".venv/", "runs/", "docs/", "**/__pycache__/", "*.egg-info/"])


def listening(address: str, timeout: float = 2.0) -> bool:
    """Whether anything accepts a TCP connection at ``address`` (``http://host:port``): the
    difference between "no cluster here" and "a cluster that refuses us"."""
    url = urlsplit(address if "://" in address else f"http://{address}")
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout):
            return True
    except OSError:
        return False


def ensure_auth_token(ray_bin: str) -> None:
    """In token mode (the default since Ray 2.59), make sure ``~/.ray/auth_token`` (or
    ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``) holds a token before ``ray start``, which refuses to
    start a head without one; ``ray get-auth-token --generate`` keeps a token already there."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    # it prints the token: keep it out of logs
    subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True,
                   stdout=subprocess.DEVNULL)


def head_command(cfg: ClusterConfig) -> list[str]:
    """``ray start --head`` for this machine: its dashboard (and job API) on loopback only."""
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={cfg.dashboard_port}",
           "--disable-usage-stats"]
    return [*cmd, f"--num-cpus={cfg.num_cpus}"] if cfg.num_cpus else cmd


def start_local_cluster(cfg: ClusterConfig) -> None:
    """Start the head, as a new user's machine needs it: the auth token is generated first
    where there is none."""
    cmd = head_command(cfg)
    ensure_auth_token(cmd[0])
    print(f"starting a local Ray cluster: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def connect(address: str, wait_s: float = 0.0) -> None:
    """Check that the job API at ``address`` answers this client, retrying for ``wait_s`` while
    a cluster starts; a clear error when nothing listens there or the cluster refuses us."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not listening(address):
        raise PlatformError(f"no Ray cluster answers at {address}: start one "
                            "(./quickstart.sh, or ray start --head)")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            JobSubmissionClient(address)
            return
        except AuthenticationError:  # something listens there, and wants a token we lack
            raise PlatformError(
                f"the cluster at {address} wants its auth token, and this client has none "
                "or another one: put that cluster's token in ~/.ray/auth_token (or "
                "RAY_AUTH_TOKEN) and run with RAY_AUTH_MODE=token") from None
        except (ConnectionError, RuntimeError, ValueError):
            if time.monotonic() >= deadline:
                raise PlatformError(f"something listens at {address}, but no Ray job API "
                                    f"answers there (waited {wait_s:.0f}s)") from None
            time.sleep(1)


def cluster_address(cfg: ClusterConfig) -> str:
    """The job API of a running cluster, starting a local one if allowed and needed."""
    if not listening(cfg.address):
        if not cfg.start_local:
            raise PlatformError(f"no Ray cluster answers at {cfg.address}: start one "
                                "(ray start --head) or set cluster.start_local: true")
        start_local_cluster(cfg)
    connect(cfg.address, wait_s=60.0)
    return cfg.address


def require_gpus(wanted: float, what: str) -> None:
    """Fail clearly where GPUs are asked for on a cluster that has none (Ray would otherwise
    wait for them forever)."""
    import ray

    if wanted and not ray.cluster_resources().get("GPU", 0):
        raise PlatformError(f"{what} asks for {wanted:g} GPU(s) but the Ray cluster has none "
                            "(set it to 0, or add GPU nodes: cluster.yaml)")
