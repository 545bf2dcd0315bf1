"""Launching a training stage on Ray Train (TorchTrainer, DDP over N workers).

The same code runs 2 CPU workers here and many GPU workers on a cluster: only ``scaling``
changes (and ``run.storage_path`` must then be shared storage, NFS or S3).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import to_dict
from retrieval_platform.encoder.backbones import BACKBONES, backbone_spec
from retrieval_platform.encoder.card import write_model_card
from retrieval_platform.encoder.model import model_info, model_location, resolve_model_folder
from retrieval_platform.errors import PlatformError
from retrieval_platform.io import write_json
from retrieval_platform.tracking import log_training
from retrieval_platform.training.checkpoint import HISTORY_FILE, MODEL_DIR, init_source
from retrieval_platform.training.config import RunConfig, ScalingConfig, TrainConfig
from retrieval_platform.training.examples import contrastive_examples, roar_examples
from retrieval_platform.training.loop import train_loop_per_worker
from retrieval_platform.training.teacher import read_teacher_scores

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model_dir: str  # a local path or a storage URI
    checkpoint_path: str
    metrics: dict[str, Any]


def build_examples(cfg: TrainConfig):  # -> pa.Table
    ds = PreparedDataset(cfg.data.prepared_dir)
    if cfg.stage == "contrastive":
        return contrastive_examples(
            ds, split=cfg.data.split, hard_negatives=cfg.data.hard_negatives,
            negatives_path=cfg.data.negatives_path,
            max_pairs_per_query=cfg.data.max_pairs_per_query,
            positive_threshold=cfg.data.positive_threshold, augment=cfg.data.augment,
            seed=cfg.run.seed,
        )
    return roar_examples(
        ds, split=cfg.data.split, max_candidates=cfg.data.max_candidates,
        negatives_path=cfg.data.negatives_path, mined_per_query=cfg.data.mined_per_query,
        grade_bins=cfg.data.grade_bins, seed=cfg.run.seed,
        teacher_scores=(read_teacher_scores(cfg.data.teacher_scores_path)
                        if cfg.data.teacher_scores_path else None),
    )


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], examples,
        scaling: ScalingConfig, run: RunConfig) -> ray.train.Result:
    """Run ``loop`` on Ray Train (DDP over ``scaling``'s workers, checkpoints and restarts as
    ``run`` says) over ``examples`` (a pyarrow table, the ``train`` dataset shard of each
    worker); the finished result, with its last checkpoint."""
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            # checkpoints: an absolute path, or a URI (s3://...) passed through as it is
            storage_path=storage.canonical(run.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            # Our own step lines say what a report says; keep Ray Train's per-report INFO out.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": ray.data.from_arrow(examples)},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {run.name} finished without a checkpoint")
    return result


@contextmanager
def published_model(result: ray.train.Result, output_dir: str
                    ) -> Iterator[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """The final checkpoint's model folder, published atomically at ``output_dir`` when the
    block ends: yields (the folder being written, the final metrics, the training curve)."""
    with result.checkpoint.as_directory() as folder, storage.publish(output_dir,
                                                                     overwrite=True) as tmp:
        shutil.copytree(Path(folder) / MODEL_DIR, tmp, dirs_exist_ok=True)
        history_file = Path(folder) / HISTORY_FILE
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        yield tmp, dict(result.metrics or {}), history


def check_examples(examples, cfg: Any) -> None:  # examples: pa.Table
    """Refuse a run whose examples do not fill one global batch; log the run's shape."""
    per_step = cfg.optim.batch_size * cfg.scaling.num_workers
    if examples.num_rows < per_step:
        raise PlatformError(
            f"{examples.num_rows} training examples, fewer than one step needs ({per_step} = "
            f"optim.batch_size × scaling.num_workers)"
        )
    log.info("%s: %d examples, %d steps of %d (%.1f epochs)", cfg.stage, examples.num_rows,
             cfg.optim.max_steps, per_step, cfg.optim.max_steps * per_step / examples.num_rows)


def train(cfg: TrainConfig) -> TrainResult:
    """Run one stage; the final model folder is published atomically at ``cfg.output_dir``."""
    # a name every worker resolves on its own node: a URI or backbone name, an absolute path
    cfg.model.init = model_location(cfg.model.init)
    if cfg.model.init in BACKBONES:  # build a converted backbone once, before the workers
        backbone_spec(cfg.model.init).resolve()
    examples = build_examples(cfg)
    check_examples(examples, cfg)
    # One id for weights across the platform: the weights file's checksum (model_info).
    init_model_id = model_info(resolve_model_folder(init_source(cfg.model.init)))["model_id"]
    result = fit(train_loop_per_worker, {"cfg": to_dict(cfg), "init_model_id": init_model_id},
                 examples, cfg.scaling, cfg.run)
    with published_model(result, cfg.output_dir) as (tmp, metrics, history):
        write_json(tmp / "training.json", {
            "stage": cfg.stage, "checkpoint": result.checkpoint.path, "final_metrics": metrics,
            "examples": examples.num_rows, "config": to_dict(cfg), "history": history,
        })
        write_model_card(tmp)
        log_training(cfg.tracking, cfg.stage, cfg.run.name, to_dict(cfg), history, metrics,
                     tmp, location=storage.canonical(cfg.output_dir))
    log.info("%s done: model at %s (%s)", cfg.stage, cfg.output_dir, json.dumps(metrics))
    return TrainResult(storage.canonical(cfg.output_dir), result.checkpoint.path, metrics)



JOB_OF_STAGE = {"contrastive": "train_jobs.contrastive", "roar": "train_jobs.roar"}


def stage_job(stage: str) -> Callable[[TrainConfig], dict[str, Any]]:
    """The body of one stage's job. The config's ``stage`` is the one source of truth; a job
    refuses a config written for the other stage instead of silently retargeting it."""

    def body(cfg: TrainConfig) -> dict[str, Any]:
        if cfg.stage != stage:
            raise PlatformError(f"this config trains stage {cfg.stage!r}: run it with "
                                f"{JOB_OF_STAGE[cfg.stage]}, not {JOB_OF_STAGE[stage]}")
        result = train(cfg)
        return {"model_dir": str(result.model_dir), "checkpoint": result.checkpoint_path,
                "metrics": result.metrics}

    return body
