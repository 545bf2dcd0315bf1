"""Fault injection for the reliability tests and benchmarks: kill real Ray processes the way a
crashed node or an OOM kill would, and observe how the platform recovers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of the Ray cluster this process is connected to (its
    state API: another Ray cluster on the same machine keeps its workers)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # this cluster only
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         detail=True, raise_on_missing_output=False)  # pid: a detail field
    return [a.pid for a in actors if a.pid]


def registered_checkpoint(run_dir: str | Path) -> bool:
    """True once Ray Train's controller has registered a checkpoint of the run (it then writes
    this snapshot); a checkpoint folder alone may not be registered yet."""
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):
        return False


def kill_train_worker_after_checkpoint(run_dir: str | Path, stop: threading.Event,
                                       poll_s: float = 0.1) -> tuple[int, float] | None:
    """SIGKILL one training worker as soon as the run has a registered checkpoint.

    Returns (pid, time.monotonic() of the kill), or None if ``stop`` was set first."""
    while not stop.is_set():
        if registered_checkpoint(run_dir) and (pids := train_worker_pids()):
            os.kill(pids[0], signal.SIGKILL)
            return pids[0], time.monotonic()
        time.sleep(poll_s)
    return None


def serve_replicas(app: str, deployment: str) -> list[tuple[str, str]]:
    """(actor name, namespace) of the live replicas of one Serve deployment."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def kill_serve_replica(app: str, deployment: str) -> str:
    """Kill one replica's actor (Serve's controller notices and starts a new one)."""
    import ray

    replicas = serve_replicas(app, deployment)
    if not replicas:
        raise RuntimeError(f"no live replica of {app}/{deployment}")
    name, namespace = replicas[0]
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=False)
    return name


def train_with_a_worker_killed(cfg) -> tuple[object, tuple[int, float] | None]:
    """Run a training stage while one worker is SIGKILLed after its first registered
    checkpoint; returns (TrainResult, (pid, kill time) or None if the run ended first)."""
    from retrieval_platform.training.trainer import train

    stop = threading.Event()
    killed: list[tuple[int, float] | None] = []
    run_dir = Path(cfg.run.storage_path).absolute() / cfg.run.name
    killer = threading.Thread(
        target=lambda: killed.append(kill_train_worker_after_checkpoint(run_dir, stop)))
    killer.start()
    try:
        result = train(cfg)
    finally:
        stop.set()
        killer.join()
    return result, killed[0] if killed else None
