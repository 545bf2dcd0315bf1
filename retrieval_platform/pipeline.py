"""The whole platform end to end, as a user drives it: a local Ray cluster with its dashboard,
every job submitted through Ray's job API (so each one shows in the dashboard, as with
``ray job submit``), then the Serve application deployed and queried over HTTP.

    retrieval-platform pipeline --config configs/synthetic/pipeline.yaml
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from retrieval_platform.cluster import ClusterConfig, cluster_address
from retrieval_platform.errors import PlatformError

log = logging.getLogger(__name__)

# Offline, quiet workers: nothing may reach a model hub, and progress bars flood job logs.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}


@dataclass
class StepConfig:
    job: str  # module, e.g. data_jobs.prepare_catalog
    config: str  # its YAML config
    set: list[str] = field(default_factory=list)  # --set overrides; "{name}" is substituted
    smoke: list[str] = field(default_factory=list)  # more --set overrides in a smoke run


@dataclass
class ServeStepConfig:
    index: str = "{storage}/indexes/{name}"
    http_port: int = 8000
    app_name: str = "retrieval"
    args: dict[str, Any] = field(default_factory=dict)  # AppArgs fields
    config_path: str = "runs/serve/{name}.yaml"  # on this machine: `serve deploy` takes it
    # A re-run while an app serves: "auto" keeps it serving through training when the cluster
    # has `cpus_needed` CPUs free beside it, then swaps the new version in (zero downtime);
    # "yes" always keeps it; "no" deletes it first (a small box: its CPUs go to training).
    keep_serving: Literal["auto", "yes", "no"] = "auto"
    cpus_needed: float = 2.0  # CPUs the steps use at once (the training workers)
    # "EveryNode" on a cluster whose nodes have addresses of their own: a proxy per node, so
    # losing a node loses no endpoint (clients list every node's URL: serving/client.py);
    # "HeadOnly" where the nodes share one address (one machine), whose ports would clash
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"


@dataclass
class PipelineConfig:
    name: str = "synthetic"
    # where every artefact goes ("{storage}" in the steps): a local folder (this machine's, so
    # a one-machine cluster), or a URI every node reaches, such as s3://bucket/prefix
    storage: str = "runs"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    steps: list[StepConfig] = field(default_factory=list)
    serve: ServeStepConfig = field(default_factory=ServeStepConfig)
    examples: list[str] = field(default_factory=list)
    report: str = "{storage}/reports/{name}/report.md"
    # a smoke-sized run of the same steps (./quickstart.sh --smoke, as CI runs it): each step
    # also takes its `smoke` overrides, and every output goes under "<name>-smoke", so that a
    # later full run never resumes a smoke run's training checkpoints
    smoke: bool = False

    @property
    def output_name(self) -> str:
        """``{name}`` in the steps: the name, with ``-smoke`` in a smoke run (whatever sets
        the name: the YAML, ``--set name=`` or ``--name``)."""
        return f"{self.name}-smoke" if self.smoke else self.name

    def step_overrides(self, step: StepConfig) -> list[str]:
        """The ``--set`` overrides of ``step``, filled in."""
        return [self.fill(item) for item in step.set + (step.smoke if self.smoke else [])]

    def fill(self, text: str) -> str:
        """``text`` with ``{name}`` and ``{storage}`` (made absolute when it is local)."""
        from retrieval_platform.storage import canonical

        return text.replace("{name}", self.output_name).replace("{storage}",
                                                                 canonical(self.storage))


def job_runtime_env(cfg: PipelineConfig, home: Path) -> dict[str, Any]:
    """What travels with every job: the code and configs (``working_dir``), and an environment
    that needs nothing of this machine."""
    from retrieval_platform.storage import canonical, is_remote
    from retrieval_platform.tracking import TRACKING_OFF_ENV

    env = dict(JOB_ENV)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    elif not is_remote(cfg.storage):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{canonical(cfg.storage)}/mlflow.db"
    else:  # a job's default store would be its temporary working directory
        env[TRACKING_OFF_ENV] = "1"
        print("experiment tracking is off for this run: set MLFLOW_TRACKING_URI to a tracking "
              "server the cluster reaches to keep its runs", flush=True)
    return {"working_dir": str((home / cfg.cluster.working_dir).resolve()),
            "excludes": list(cfg.cluster.excludes), "env_vars": env}


AGENT_WAIT_S = 120.0  # how long a job submission waits for the cluster's job agent


def submit(address: str, entrypoint: str, runtime_env: dict[str, Any], *, name: str) -> str:
    """Submit one job, stream its logs, and raise if it does not succeed; its job id."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    submission_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                       runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            # a cluster just started (or a busy machine) answers 500 until its node's job
            # agent has registered: wait for it, a bounded while
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"\n=== {name}: job {job_id} (ray job logs {job_id} --address {address})", flush=True)
    started, offset = time.monotonic(), 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > offset:
            sys.stdout.write(logs[offset:])
            sys.stdout.flush()
            offset = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    took = time.monotonic() - started
    if status != JobStatus.SUCCEEDED:
        raise PlatformError(f"job {name} ({job_id}) {status.value} after {took:.0f}s; "
                            "its log is above")
    print(f"=== {name}: succeeded in {took:.0f}s", flush=True)
    return job_id


def run_pipeline(cfg: PipelineConfig, home: Path) -> dict[str, Any]:
    """Every step as a Ray job, then Serve, then example queries over HTTP."""
    import ray

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    address = cluster_address(cfg.cluster)
    timings["cluster"] = time.monotonic() - t0
    serving = keep_or_stop_serving(cfg)
    runtime_env = job_runtime_env(cfg, home)
    python = cfg.cluster.python or sys.executable
    jobs = {}
    for step in cfg.steps:
        args = [python, "-m", step.job, "--config", step.config]
        for item in cfg.step_overrides(step):
            args += ["--set", item]
        started = time.monotonic()
        name = step.job.split(".")[-1]
        jobs[name] = submit(address, shlex.join(args), runtime_env, name=name)
        timings[step.job] = time.monotonic() - started

    started = time.monotonic()
    ray.init(address=cfg.cluster.gcs_address, logging_level=logging.WARNING,
             configure_logging=False)
    try:
        url = swap_in(cfg, home) if serving else deploy_serve(cfg, home)
    finally:
        ray.shutdown()
    timings["serve"] = time.monotonic() - started
    answers = query_examples(url, cfg.examples, rerank=bool(cfg.serve.args.get("reranker")))
    return {"address": address, "url": url, "timings": timings, "answers": answers,
            "jobs": jobs, "storage": cfg.fill("{storage}")}


def keep_or_stop_serving(pipeline: PipelineConfig) -> bool:
    """Whether a running application keeps serving while the steps run (say which, and why);
    if not, delete it now so that its replicas' CPUs go to the steps."""
    import ray
    from ray import serve

    cfg = pipeline.serve
    ray.init(address=pipeline.cluster.gcs_address, logging_level=logging.WARNING,
             configure_logging=False)
    try:
        try:
            running = cfg.app_name in serve.status().applications
        except Exception:  # no Serve instance on the cluster yet
            running = False
        if not running:
            return False
        free = ray.available_resources().get("CPU", 0.0)
        keep = cfg.keep_serving == "yes" or (cfg.keep_serving == "auto"
                                             and free >= cfg.cpus_needed)
        if keep:
            print(f"the Serve application {cfg.app_name!r} keeps serving while the new version "
                  f"is built ({free:g} CPUs free beside it); it is swapped in at the end, "
                  "without dropping a request", flush=True)
        else:
            print(f"stopping the Serve application {cfg.app_name!r} until the new version is "
                  f"ready: {free:g} CPUs free beside it, the steps need {cfg.cpus_needed:g} "
                  "(serve.keep_serving: yes keeps it anyway)", flush=True)
            serve.delete(cfg.app_name)
        return keep
    finally:
        ray.shutdown()


def swap_in(cfg: PipelineConfig, home: Path) -> str:
    """Serve the new index version in the running application, in place (control.swap_version:
    zero downtime); a new shard count needs a fresh deployment instead."""
    from retrieval_platform.index.store import resolve_index_dir
    from retrieval_platform.serving.control import swap_version

    index = resolve_index_dir(cfg.fill(cfg.serve.index))
    try:
        swapped = swap_version(index, app_name=cfg.serve.app_name)
    except PlatformError as exc:
        print(f"\n=== serve: cannot swap in place ({exc}); deploying afresh", flush=True)
        return deploy_serve(cfg, home)
    print(f"\n=== serve: swapped {swapped['from']} -> {swapped['to']} in place", flush=True)
    return f"http://127.0.0.1:{cfg.serve.http_port}"


def deploy_serve(cfg: PipelineConfig, home: Path) -> str:
    from ray import serve

    from retrieval_platform.encoder.model import model_location
    from retrieval_platform.index.store import resolve_index_dir
    from retrieval_platform.serving.app import AppArgs
    from retrieval_platform.serving.control import (
        app_config,
        apply,
        serve_config,
        write_serve_config,
    )

    index = resolve_index_dir(cfg.fill(cfg.serve.index))
    args = AppArgs.model_validate({"index": index} | cfg.serve.args)
    if args.reranker is not None:  # named as every node names it (the index is, above)
        args.reranker.model = model_location(cfg.fill(args.reranker.model))
    config = serve_config([app_config(args, name=cfg.serve.app_name)],
                          port=cfg.serve.http_port, proxy_location=cfg.serve.proxy_location)
    path = write_serve_config(home / cfg.fill(cfg.serve.config_path), config)
    print(f"\n=== serve: deploying {path} (serve deploy {path} does the same)", flush=True)
    serve.start(proxy_location=cfg.serve.proxy_location,
                http_options={"host": "127.0.0.1", "port": cfg.serve.http_port})
    apply(config)
    return f"http://127.0.0.1:{cfg.serve.http_port}"


def query_examples(url: str, queries: list[str], k: int = 3, rerank: bool = False
                   ) -> list[dict[str, Any]]:
    """Each query in dense and hybrid mode (and hybrid reranked, where a reranker serves)."""
    from retrieval_platform.serving.client import SearchClient

    answers = []
    modes = [("dense", False), ("hybrid", False)] + ([("hybrid", True)] if rerank else [])
    with SearchClient(url) as client:
        for query in queries:
            for mode, reranked in modes:
                body = client.search(query, k, mode, rerank=reranked)
                if reranked:
                    mode += ", reranked" if body["reranked"] else ", not reranked: " + str(
                        body["rerank_error"])
                answers.append({"query": query, "mode": mode,
                                "results": [(h["title"], round(h["score"], 3))
                                            for h in body["results"]],
                                "ms": body["timings_ms"]["total"]})
    return answers


def print_summary(cfg: PipelineConfig, home: Path, out: dict[str, Any]) -> None:
    print("\n=== example queries (POST /search)")
    for a in out["answers"]:
        print(f"\n  {a['query']!r} [{a['mode']}, {a['ms']:.0f} ms]")
        for title, score in a["results"]:
            print(f"    {score:>7.3f}  {title}")
    from retrieval_platform import storage

    report = cfg.fill(cfg.report)
    if storage.exists(report):
        print("\n=== evaluation (" + report + ")\n")
        print("\n".join(line for line in storage.read_text(report).splitlines()
                        if line.startswith("|")))
    print("\n=== step wall times: " + json.dumps({k: round(v) for k, v in out["timings"].items()}))
    print(f"""
Ray dashboard:   {out['address']}   (jobs, Serve, metrics)
Search API:      {out['url']}/search   (POST {{"query": "...", "k": 10, "mode": "hybrid"}})
API docs:        {out['url']}/docs
Report:          {report} (and report.png beside it)
Try:             curl -s {out['url']}/search -H 'content-type: application/json' \\
                   -d '{{"query": "{(cfg.examples or ['shoes'])[0]}", "k": 5}}'
Stop everything: ./quickstart.sh stop   (or: {shutil.which('ray') or 'ray'} stop)""")
