"""Jobs submitted to the local cluster through Ray's job API, as `ray job submit` does."""

from __future__ import annotations

import sys
import time

import pytest

from tests.helpers import REPO


def _runtime_env(tmp_path) -> dict:
    """What the pipeline ships with a job: this repository as its working_dir, no path of
    this machine's in its environment."""
    from retrieval_platform.pipeline import PipelineConfig, job_runtime_env

    env = job_runtime_env(PipelineConfig(storage=str(tmp_path)), REPO)
    env["env_vars"]["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    return env


def where_it_ran(logs: str) -> dict:
    """The node, working directory and code a job logged (jobs.where_this_runs)."""
    import json
    import re

    return json.loads(re.search(r" runs on (\{.*\})", logs).group(1))


@pytest.fixture(scope="module")
def jobs(ray_local):
    from ray.job_submission import JobSubmissionClient

    webui = ray_local._private.worker.global_worker.node.address_info["webui_url"]
    return JobSubmissionClient(f"http://{webui}")


def _wait(client, job_id: str, timeout_s: float = 240):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} did not finish in {timeout_s}s:\n{client.get_job_logs(job_id)}")


def test_a_submitted_job_succeeds_and_writes_its_output(jobs, tmp_path):
    """The job runs its own copy of the code and configs (working_dir) and writes to the
    storage location it is given."""
    from ray.job_submission import JobStatus

    out = tmp_path / "prepared"
    job_id = jobs.submit_job(
        entrypoint=f"{sys.executable} -m data_jobs.prepare_catalog "
                   f"--config configs/synthetic/prepare.yaml --set source.num_products=300 "
                   f"--set output_dir={out}",
        runtime_env=_runtime_env(tmp_path),
    )
    status = _wait(jobs, job_id)
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert (out / "manifest.json").is_file()
    assert '"accepted": 300' in logs
    ran = where_it_ran(logs)
    assert ran["cwd"] != str(REPO) and ran["code"].startswith(ran["cwd"]), ran


def test_a_failing_job_fails_with_a_clear_message(jobs, tmp_path):
    from ray.job_submission import JobStatus

    job_id = jobs.submit_job(
        entrypoint=f"{sys.executable} -m data_jobs.prepare_catalog --set source.format=homedepot "
                   f"--set source.path={tmp_path}/missing --set output_dir={tmp_path}/out",
        runtime_env=_runtime_env(tmp_path),
    )
    assert _wait(jobs, job_id) == JobStatus.FAILED
    logs = jobs.get_job_logs(job_id)
    assert "prepare_catalog: error:" in logs and "products.csv: file not found" in logs
    assert "Traceback" not in logs


def test_a_stale_cluster_record_falls_back_to_a_local_ray(tmp_path, monkeypatch):
    """`ray start` leaves /tmp/ray/ray_current_cluster behind; after a reboot it names a dead
    GCS, which ray.init would retry for minutes. A job probes it and runs on a local Ray."""
    import socket

    from retrieval_platform.jobs import _live_recorded_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert _live_recorded_cluster() == "local"  # no record at all
    (tmp_path / "ray").mkdir()
    record = tmp_path / "ray" / "ray_current_cluster"
    with socket.create_server(("127.0.0.1", 0)) as live:
        record.write_text(f"127.0.0.1:{live.getsockname()[1]}\n")
        assert _live_recorded_cluster() == f"127.0.0.1:{live.getsockname()[1]}"
        dead_port = live.getsockname()[1]
    record.write_text(f"127.0.0.1:{dead_port}")  # the server is closed: connection refused
    assert _live_recorded_cluster() == "local"


def test_ray_data_progress_logs_only_for_long_datasets():
    """A dataset's immediate progress block is dropped, its later (periodic) blocks kept."""
    import logging

    from retrieval_platform.jobs import _DropExecutionBanners

    def record(message: str, filename: str = "logging_progress.py",
               level: int = logging.INFO) -> logging.LogRecord:
        rec = logging.LogRecord("ray.data", level, filename, 1, message, None, None)
        rec.filename = filename
        return rec

    block = ["======= Running Dataset: ds_1 =======", "Total Progress: 0/?", "",
             "MapBatches(f): 0/1", "=" * 38]
    keep = _DropExecutionBanners()
    assert [keep.filter(record(m)) for m in block] == [False] * 5  # first block: dropped
    assert [keep.filter(record(m)) for m in block] == [True] * 5  # 10 s later: kept
    assert not keep.filter(record("Execution plan: ...", "streaming_executor.py"))
    assert keep.filter(record("out of memory", "streaming_executor.py", logging.WARNING))
    assert keep.filter(record("a job's own line", "prepare.py"))
