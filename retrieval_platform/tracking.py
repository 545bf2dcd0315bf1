"""Experiment tracking with MLflow: every training and evaluation run is logged (config, per-step
training metrics, evaluation metrics, reports and model cards as artifacts), so runs can be
compared in the MLflow UI.

The store is ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file at
``runs/mlflow.db`` with artifacts in ``runs/mlartifacts`` (local, nothing to run). Browse it with
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --host 127.0.0.1`` (the UI needs the
full ``mlflow`` package: ``pip install mlflow``). Logging happens in the driver after the
work is done, from what training already keeps (the per-step history of its checkpoints), so a
tracking store that is down costs a warning, never a run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# Set by the pipeline on jobs whose store would be a temporary folder (remote storage and no
# MLFLOW_TRACKING_URI): a tracking server is what a cluster needs.
TRACKING_OFF_ENV = "RP_TRACKING_OFF"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # an MLflow tracking URI; default: $MLFLOW_TRACKING_URI or runs/
    experiment: str | None = None  # default: the job's ("train-contrastive", "evaluate")


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path('runs').absolute() / 'mlflow.db'}"


def metric_key(name: str) -> str:
    """MLflow metric and param names allow letters, digits, ``_-./`` and spaces:
    ``hybrid(stage1+bm25)/ndcg@10`` becomes ``hybrid_stage1_bm25_/ndcg_10``."""
    return re.sub(r"[^\w\-. /]", "_", name)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``a.b.c`` params (values as strings, at most 500 characters)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[metric_key(name)] = str(value)[:500]
    return out


@contextmanager
def tracked_run(cfg: TrackingConfig, experiment: str, run_name: str,
                tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An active MLflow run (the ``mlflow`` module), or None when tracking is off or its
    store cannot be reached (a warning; the work itself already succeeded)."""
    if not cfg.enabled or os.environ.get(TRACKING_OFF_ENV) == "1":
        yield None
        return
    try:
        import mlflow

        uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(uri)
        name = cfg.experiment or experiment
        if mlflow.get_experiment_by_name(name) is None:
            artifacts = None
            if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
                artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            mlflow.create_experiment(name, artifact_location=artifacts)
        mlflow.set_experiment(name)
        run = mlflow.start_run(run_name=run_name, tags=dict(tags or {}))
    except Exception as exc:  # tracking must never fail the job that finished
        log.warning("MLflow tracking unavailable (%s: %s); run not logged",
                    type(exc).__name__, exc)
        yield None
        return
    with run:
        yield mlflow
    log.info("logged to MLflow: %s, experiment %s, run %s", uri, name, run.info.run_id)


def log_training(cfg: TrackingConfig, stage: str, run_name: str, config: Mapping[str, Any],
                 history: list[dict[str, float]], final: Mapping[str, Any],
                 model_dir: Path, location: str | None = None) -> None:
    """A finished training run: its config, every logged step's metrics (loss, masked
    fractions, in-batch accuracy, lr, pairs/s), the final metrics, the model card and
    training record (read from ``model_dir``) as artifacts, and where the model lives
    (``location``, default ``model_dir``) as a tag."""
    with tracked_run(cfg, f"train-{stage}", run_name,
                     {"stage": stage, "model_dir": location or str(model_dir)}) as mlflow:
        if mlflow is None:
            return
        mlflow.log_params(flatten(config))
        for entry in history:
            step = int(entry.get("step", 0))
            mlflow.log_metrics({metric_key(k): float(v) for k, v in entry.items()
                                if k != "step" and isinstance(v, int | float)}, step=step)
        mlflow.log_metrics({f"final/{metric_key(k)}": float(v) for k, v in final.items()
                            if isinstance(v, int | float)})
        for name in ("README.md", "training.json", "retrieval_platform.json"):
            if (model_dir / name).is_file():
                mlflow.log_artifact(str(model_dir / name))


def log_evaluation(cfg: TrackingConfig, report: Mapping[str, Any], out_dir: Path,
                   name: str | None = None) -> None:
    """An evaluation: dataset, split, sizes and models as params; every system's metrics as
    ``SYSTEM/METRIC``; the report files as artifacts."""
    with tracked_run(cfg, "evaluate", name or out_dir.name,
                     {"split": str(report["split"]), "dataset": str(report["dataset"])}
                     ) as mlflow:
        if mlflow is None:
            return
        mlflow.log_params({"split": report["split"], "queries": report["queries"],
                           "products": report["products"], "dataset": report["dataset"]}
                          | {metric_key(f"model.{n}"): m["model_id"]
                             for n, m in report.get("models", {}).items()})
        mlflow.log_metrics({metric_key(f"{system}/{k}"): float(v)
                            for system, metrics in report["results"].items()
                            for k, v in metrics.items() if isinstance(v, int | float)})
        for path in sorted(out_dir.glob("*")):
            if path.suffix in (".md", ".png", ".json") and path.is_file():
                mlflow.log_artifact(str(path))
