"""The per-worker training recipe of both stages (runs inside Ray Train's TorchTrainer): parse
the config, build the model (restored from a checkpoint, LoRA, optimizer, DDP), run the steps
until ``max_steps``, and report with checkpoints.

What a step computes lives in :mod:`retrieval_platform.training.objectives` (the losses on the
global batch), the gathering across workers in :mod:`~retrieval_platform.training.distributed`,
the batch's columns in :mod:`~retrieval_platform.training.examples`, the checkpoints in
:mod:`~retrieval_platform.training.checkpoint`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from retrieval_platform.config import from_dict
from retrieval_platform.encoder.lora import add_lora
from retrieval_platform.encoder.model import DualEncoder, resolve_precision
from retrieval_platform.errors import PlatformError
from retrieval_platform.training.checkpoint import (
    Progress,
    encoder_metadata,
    init_source,
    restore,
    save_and_report,
)
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.examples import sample_negatives
from retrieval_platform.training.grad_cache import backward, cached_backward
from retrieval_platform.training.objectives import OBJECTIVES

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up, then linear decay to zero at max_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, o.max_steps - o.warmup_steps)
    return o.lr * max(0.0, 1 - (step - o.warmup_steps) / span)


def batch_columns(batch: pa.Table) -> dict[str, list]:
    return {name: batch[name].to_pylist() for name in batch.column_names}


def load_init(model_cfg: Any) -> DualEncoder:
    """The starting model: a backbone, a model folder or a checkpoint (``model.init``), with the
    config's encoder settings."""
    src = init_source(model_cfg.init)
    overrides = {k: v for k, v in asdict(model_cfg).items() if k not in ("init", "lora")}
    model = DualEncoder.from_pretrained(src, **overrides)
    for name, param in model.backbone.named_parameters():
        if name.startswith("pooler."):  # BERT's pooler is not used by our pooling: keep it frozen
            param.requires_grad_(False)
    return model


def step_columns(batch: pa.Table, cfg: Any, epoch: int, step: int,
                 rank: int) -> dict[str, list]:
    """A batch as columns, with stage 1's negatives drawn afresh from each row's pool (seeded
    by run, epoch, step and rank: resumable and repeatable)."""
    columns = batch_columns(batch)
    if cfg.stage == "contrastive" and cfg.data.hard_negatives:
        rng = np.random.default_rng([cfg.run.seed, epoch, step, rank])
        return sample_negatives(columns, cfg.data.hard_negatives, rng)
    if cfg.stage == "contrastive":
        columns |= {k: [[] for _ in columns["query_text"]]
                    for k in ("neg_texts", "neg_keys", "neg_group_keys")}
    return columns


def log_to_stderr() -> None:
    """A Train worker has no logging set up: the training package's lines (steps, resumes) go
    to its stderr. Ray Train logs every report at INFO under a file-path logger name; our step
    lines already carry the metrics, so that logger is kept to warnings."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: keep its logs
        pass
    training = logging.getLogger("retrieval_platform.training")
    if not training.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        training.addHandler(handler)
        training.setLevel(logging.INFO)
        training.propagate = False


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["cfg"]`` is a TrainConfig as a plain dict,
    ``config["init_model_id"]`` the starting weights' id (``model_info``), recorded in every
    checkpoint."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])  # parse
    log_to_stderr()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))

    model = load_init(cfg.model)  # build
    progress = restore(model, ray.train.get_checkpoint())
    if cfg.model.lora is not None:  # adapters on the (possibly resumed, merged) weights
        model.backbone = add_lora(model.backbone, cfg.model.lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    if progress.optimizer_state is not None and cfg.model.lora is None:  # fresh adapters start
        optimizer.load_state_dict(progress.optimizer_state)  # with fresh moments
    forward = ray.train.torch.prepare_model(model)  # DDP across workers (gloo on CPU)
    device = next(model.parameters()).device
    bf16 = resolve_precision(cfg.optim.precision, device.type) == "bf16"

    def report(metrics: dict[str, float], save: bool) -> None:
        save_and_report(model, optimizer, progress, metrics, encoder_metadata(
            cfg, model, progress, config.get("init_model_id", "")), save)

    if progress.step >= cfg.optim.max_steps:  # a finished run rerun under its name
        report({"step": progress.step, "epoch": progress.epoch,
                "resumed_from_step": progress.resumed_from}, save=True)
        return
    model.train()  # run
    run_steps(cfg, model, forward, optimizer, progress, report, rank, world, bf16, _step)


@dataclass(frozen=True)
class CpuTimes:
    """The host's CPU time (Linux ``/proc/stat``, all cores, in ticks). Steal is time a
    virtual machine's cores waited while the hypervisor ran another guest: with ``cpu_busy``
    it tells apart the reasons one config trains at half the pairs/s on a machine of the same
    size (docs/BENCHMARKS.md "Training throughput": a contended host, or another job)."""

    busy: int
    steal: int
    total: int

    @staticmethod
    def now() -> CpuTimes | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):  # not Linux: no host shares in the metrics
            return None
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        idle, steal = sum(fields[3:5]), fields[7] if len(fields) > 7 else 0
        total = sum(fields[:8])
        return CpuTimes(busy=total - idle - steal, steal=steal, total=total)


def cpu_shares(start: CpuTimes | None, end: CpuTimes | None) -> dict[str, float]:
    """Between two readings: ``cpu_steal``, the share of host CPU time stolen by the
    hypervisor, and ``cpu_busy``, the share spent running (this run and anything else on the
    host); nothing where either reading is missing."""
    if start is None or end is None or end.total <= start.total:
        return {}
    span = end.total - start.total
    return {"cpu_steal": (end.steal - start.steal) / span,
            "cpu_busy": (end.busy - start.busy) / span}


StepFn = Callable[[Any, Any, Any, torch.optim.Optimizer, dict[str, list], float, bool],
                  dict[str, float]]


def run_steps(cfg: Any, model: Any, forward: Any, optimizer: torch.optim.Optimizer,
              p: Progress, report: Any, rank: int, world: int, bf16: bool,
              step: StepFn) -> None:
    """Epochs over this worker's shard until ``max_steps``: a ``step`` (of a dual encoder, or
    of the reranker: ``cfg`` has ``optim``, ``run``, ``stage`` and ``data.split``), then every
    ``log_every`` steps a report (with a checkpoint every ``checkpoint_every`` and at the
    end)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    window_start, window_samples = time.perf_counter(), 0
    cpu_window = CpuTimes.now()
    while p.step < cfg.optim.max_steps:
        batches, skip = 0, p.batch_in_epoch  # a resumed epoch skips the batches it has seen
        for batch in shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="pyarrow",
                                        drop_last=True):
            batches += 1
            if skip:
                skip -= 1
                continue
            p.batch_in_epoch += 1
            lr = lr_at(p.step, cfg)
            metrics = step(cfg, model, forward, optimizer, step_columns(
                batch, cfg, p.epoch, p.step, rank), lr, bf16)
            p.step += 1
            window_samples += batch.num_rows * world
            last = p.step >= cfg.optim.max_steps
            save = last or p.step % cfg.run.checkpoint_every == 0
            if save or p.step % cfg.run.log_every == 0:
                elapsed = time.perf_counter() - window_start
                metrics |= {"step": p.step, "epoch": p.epoch, "lr": lr,
                            "resumed_from_step": p.resumed_from,
                            "samples_per_s": window_samples / max(elapsed, 1e-9)}
                cpu_now = CpuTimes.now()
                metrics |= cpu_shares(cpu_window, cpu_now)
                cpu_window = cpu_now
                p.history.append(metrics)
                if rank == 0:  # through logging: Ray Train tees print() into its log twice
                    log.info("[%s] step %d/%d %s", cfg.stage, p.step, cfg.optim.max_steps,
                             " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))
                report(metrics, save)
                window_start, window_samples = time.perf_counter(), 0
            if last:
                break
        if batches == 0:
            raise PlatformError(
                f"the {cfg.data.split} split gives no full batch of {cfg.optim.batch_size} per "
                f"worker ({world} workers): lower optim.batch_size or scaling.num_workers"
            )
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0


def _step(cfg: TrainConfig, model: DualEncoder, forward: Any, optimizer: torch.optim.Optimizer,
          columns: dict[str, list], lr: float, bf16: bool) -> dict[str, float]:
    """One optimizer step of the stage's objective at learning rate ``lr``; its metrics."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    run = cached_backward if cfg.optim.grad_cache else backward
    device_type = next(model.parameters()).device.type

    def autocast() -> torch.autocast:  # bf16 covers the backbone; losses run in fp32 (losses/)
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)

    _, metrics = run(model, forward, OBJECTIVES[cfg.stage](columns, cfg),
                     cfg.optim.length_bucket, autocast)
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    return metrics
