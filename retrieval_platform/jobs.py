"""What every job entry point shares: logging, connecting to Ray, and turning errors into a clear
message and an exit code (2: fix your input; 1: a bug or an infrastructure failure)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retrieval_platform.errors import PlatformError

log = logging.getLogger("retrieval_platform")


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("filelock", "httpx", "urllib3", "bm25s", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_ray_data()


class _DropExecutionBanners(logging.Filter):
    """Ray Data prints three INFO lines per dataset execution (plan, start, sink), and without a
    terminal a seven-line progress block as soon as each dataset starts, then every 10 s. A job
    that runs a dozen short datasets floods its log. Keep warnings and the periodic progress of
    datasets that run long; drop the banners and each dataset's first (immediate) block."""

    NOISY_FILES = frozenset({"streaming_executor.py", "dataset.py", "__init__.py"})

    def __init__(self) -> None:
        super().__init__()
        self._seen_datasets: set[str] = set()
        self._dropping_block = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.filename in self.NOISY_FILES:
            return False
        if record.filename != "logging_progress.py":
            return True
        message = record.getMessage()
        if message.startswith("======= Running Dataset: "):
            dataset = message.split()[3]
            self._dropping_block = dataset not in self._seen_datasets
            self._seen_datasets.add(dataset)
            return not self._dropping_block
        if self._dropping_block:
            if message and set(message) == {"="}:  # the block's closing rule
                self._dropping_block = False
            return False
        return True


def quiet_ray_data() -> None:
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its console handler)

    for handler in logging.getLogger("ray.data").handlers:
        if not any(isinstance(f, _DropExecutionBanners) for f in handler.filters):
            handler.addFilter(_DropExecutionBanners())


@contextmanager
def ray_session() -> Iterator[None]:
    """Connect to the cluster named by RAY_ADDRESS (set by ``ray job submit``), else to a cluster
    started on this machine with ``ray start``, else start a local one for this job."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS") or _live_recorded_cluster()
    try:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    except ConnectionError as exc:
        raise PlatformError(
            f"cannot reach the Ray cluster at {address!r} ({exc}). Start one with "
            "`ray start --head` or unset RAY_ADDRESS to run on a local one."
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _live_recorded_cluster() -> str:
    """The cluster ``ray start`` recorded on this machine if its GCS answers, else "local".

    Ray's own auto-detection trusts the record and, when the machine rebooted or changed its
    address since, retries the dead GCS for minutes; a two-second probe turns that into a
    warning and a local Ray for this job."""
    ray_tmp = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    record = ray_tmp / "ray_current_cluster"
    try:
        recorded = record.read_text().strip()
    except OSError:
        return "local"
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return recorded
    except (OSError, ValueError):
        log.warning("the Ray cluster recorded in %s (%s) does not answer: starting a local Ray "
                    "for this job (`ray stop` clears the record)", record, recorded)
        return "local"


def run_job(name: str, body: Callable[[], object]) -> int:
    """Run ``body`` inside a Ray session; return the process exit code.

    Relative paths in configs resolve against the working directory: under ``ray job submit
    --working-dir`` that is the job's own copy of the code, so outputs meant to outlive the job
    name a storage location (an absolute path, or a URI such as ``s3://bucket/prefix``)."""
    configure_logging()
    try:
        with ray_session():
            log.info("%s runs on %s", name, json.dumps(where_this_runs()))
            body()
    except PlatformError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{name}: failed (see the traceback above)", file=sys.stderr)
        return 1
    return 0


def where_this_runs() -> dict[str, str]:
    """This process's node, host, working directory and code (logged by every job, so that a
    cluster run shows where each piece ran and which copy of the code it ran)."""
    import ray

    import retrieval_platform

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(), "cwd": os.getcwd(),
            "code": str(Path(retrieval_platform.__file__).parent)}


def job_main(name: str, config_cls: type, body: Callable[[Any], Any], argv: list[str] | None,
             description: str, summarize: Callable[[Any], Any] | None = None) -> int:
    """parse -> run -> print a JSON summary: the whole ``main`` of a job entry point."""
    from retrieval_platform.config import parse_job_args

    cfg = parse_job_args(config_cls, argv, description)

    def run() -> None:
        result = body(cfg)
        summary = summarize(result) if summarize else result
        print(summary if isinstance(summary, str) else json.dumps(summary, indent=2, default=str))

    return run_job(name, run)
