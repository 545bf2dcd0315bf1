"""Jobs submitted to the local cluster through Ray's job API, as `ray job submit` does."""

from __future__ import annotations

import sys
import time

import pytest

from tests.conftest import REPO

JOB_ENV = {"HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RP_HOME": str(REPO)}


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
    from ray.job_submission import JobStatus

    out = tmp_path / "prepared"
    job_id = jobs.submit_job(
        entrypoint=f"{sys.executable} -m data_jobs.prepare_catalog "
                   f"--config configs/prepare_synthetic.yaml --set source.num_products=300 "
                   f"--set output_dir={out}",
        runtime_env={"env_vars": JOB_ENV},
    )
    status = _wait(jobs, job_id)
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert (out / "manifest.json").is_file()
    assert '"accepted": 300' in logs


def test_a_failing_job_fails_with_a_clear_message(jobs, tmp_path):
    from ray.job_submission import JobStatus

    job_id = jobs.submit_job(
        entrypoint=f"{sys.executable} -m data_jobs.prepare_catalog --set source.format=homedepot "
                   f"--set source.path={tmp_path}/missing --set output_dir={tmp_path}/out",
        runtime_env={"env_vars": JOB_ENV},
    )
    assert _wait(jobs, job_id) == JobStatus.FAILED
    logs = jobs.get_job_logs(job_id)
    assert "prepare_catalog: error:" in logs and "products.csv: file not found" in logs
    assert "Traceback" not in logs
