"""Ray Train checkpoints of a run: what one holds (the model folder, the optimizer and where the
run is, its metrics and training curve), writing one from rank 0 with a report, and restoring
from one (a restarted worker group, or a rerun of the same run name)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retrieval_platform import storage
from retrieval_platform.encoder.model import DualEncoder
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.objectives import matryoshka_dims

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
HISTORY_FILE = "history.json"


@dataclass
class Progress:
    """Where a run is: restored from a checkpoint, saved into the next one."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # the training curve
    optimizer_state: dict[str, Any] | None = None


def init_source(init: str) -> str:
    """A backbone name or model folder as given (a storage URI: this node's copy of it); a Ray
    Train checkpoint folder: its model."""
    if storage.is_remote(init):
        init = str(storage.fetch(init))
    if (Path(init) / MODEL_DIR / "config.json").is_file():
        return str(Path(init) / MODEL_DIR)
    return init


def restore(model: Any, checkpoint: Any) -> Progress:
    """Load a checkpoint's weights into ``model`` (a :class:`DualEncoder` or a reranker: any
    model with ``backbone`` and a ``from_pretrained`` of its saved folder) and return its
    progress; a fresh run (no checkpoint) starts at step 0."""
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as folder:
        resumed = type(model).from_pretrained(Path(folder) / MODEL_DIR)
        model.backbone.load_state_dict(resumed.backbone.state_dict())
        # our own file, written by save_and_report below: tensors only (weights_only)
        state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
        history_file = Path(folder) / HISTORY_FILE
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
    step = int(state["step"])
    log.info("resumed from step %d (checkpoint %s)", step, checkpoint.path)
    return Progress(step, int(state["epoch"]), int(state["batch_in_epoch"]), step, history,
                    state["optimizer"])


def encoder_metadata(cfg: TrainConfig, model: DualEncoder, progress: Progress,
                     init_id: str) -> dict[str, Any]:
    """What a dual-encoder checkpoint's model folder records about its run."""
    return {"stage": cfg.stage, "step": progress.step, "run": cfg.run.name,
            "init": cfg.model.init, "init_model_id": init_id,
            # the dimensions this model serves well (full first)
            "matryoshka_dims": [model.dim, *[d for d in matryoshka_dims(cfg, model.dim) if d]]}


def save_and_report(model: Any, optimizer: torch.optim.Optimizer, progress: Progress,
                    metrics: dict[str, float], metadata: dict[str, Any], save: bool) -> None:
    """Report ``metrics`` to Ray Train; with ``save``, rank 0 attaches a checkpoint: the model
    folder (``model.save(folder, metadata)``), the optimizer and progress, the metrics and the
    history so far."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            model.save(Path(tmp) / MODEL_DIR, metadata)
            torch.save({"optimizer": optimizer.state_dict(), "step": progress.step,
                        "epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch},
                       Path(tmp) / STATE_FILE)
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(progress.history))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
