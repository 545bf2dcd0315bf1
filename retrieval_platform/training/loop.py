"""The per-worker training loop of both stages (runs inside Ray Train's TorchTrainer).

Stage 1 loss: Eq. 1–3 with candidates all-gathered across workers (gradients kept for the local
part). Stage 2 loss: Eq. 7 = ROAR (Eq. 4–6) + λ · L₁ on each query's top-group pair, the L₁
candidates being the worker's own batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from retrieval_platform.config import from_dict
from retrieval_platform.encoder.model import DualEncoder
from retrieval_platform.errors import PlatformError
from retrieval_platform.losses import masked_contrastive_loss, roar_loss
from retrieval_platform.training.config import TrainConfig

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0; the local slice keeps its gradient, the others are constants."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _padded(rows: list[list[int]], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0) or 1
    values = torch.full((len(rows), width), fill, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return values, valid


def _known_positive(cand_keys: torch.Tensor, query_pos_keys: list[list[int]]) -> torch.Tensor:
    """(B, N): candidate j is a labelled positive of query i (METHOD.md Eq. 2, label rule)."""
    keys, valid = _padded(query_pos_keys)  # (B, P)
    hit = cand_keys[None, :, None] == keys[:, None, :]  # (B, N, P)
    return (hit & valid[:, None, :]).any(-1)  # (B, N)


def contrastive_step(model: DualEncoder, forward: Any, batch: dict[str, list],
                     cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1–3 on one batch of pairs; candidates = all positives and negatives of all workers."""
    B = len(batch["query_text"])
    H = len(batch["neg_texts"][0]) if batch["neg_texts"] else 0
    texts = list(batch["pos_text"]) + [t for negs in batch["neg_texts"] for t in negs]
    q = forward(**model.tokenize(list(batch["query_text"]), "query"))  # (B, D)
    c_local = forward(**model.tokenize(texts, "product"))  # (B(1+H), D)
    keys = torch.tensor(list(batch["pos_key"]) + [k for ks in batch["neg_keys"] for k in ks])
    groups = torch.tensor(list(batch["pos_group_key"])
                          + [k for ks in batch["neg_group_keys"] for k in ks])
    c = gather_with_grad(c_local)  # (N, D), N = world·B(1+H)
    all_keys = gather_with_grad(keys)  # (N,)
    all_groups = gather_with_grad(groups)  # (N,)
    positive = _rank() * B * (1 + H) + torch.arange(B)  # (B,) own positives in c
    pos_groups = torch.tensor(batch["pos_group_key"])  # (B,)
    same_group = (all_groups[None, :] == pos_groups[:, None]) if cfg.loss.catalog_rule else None
    known = _known_positive(all_keys, batch["query_pos_keys"]) if cfg.loss.label_rule else None
    out = masked_contrastive_loss(q, c, positive, tau=cfg.loss.tau, margin=cfg.loss.margin,
                                  same_group=same_group, known_positive=known)
    return out.loss, {"loss": out.loss.item(), "masked_fraction": out.masked_fraction.item(),
                      "margin_masked_fraction": out.margin_masked_fraction.item(),
                      "in_batch_accuracy": out.accuracy.item()}


def roar_step(model: DualEncoder, forward: Any, batch: dict[str, list],
              cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 7: mean ROAR over the batch's queries + λ · L₁ on their top-group pairs."""
    counts = [len(c) for c in batch["cand_texts"]]
    Q, C = len(counts), max(counts)
    q = forward(**model.tokenize(list(batch["query_text"]), "query"))  # (Q, D)
    flat = forward(**model.tokenize([t for ts in batch["cand_texts"] for t in ts], "product"))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    index = torch.zeros((Q, C), dtype=torch.long)
    valid = torch.zeros((Q, C), dtype=torch.bool)
    grades = torch.zeros((Q, C))
    for i, n in enumerate(counts):
        index[i, :n] = torch.arange(offsets[i], offsets[i] + n)
        valid[i, :n] = True
        grades[i, :n] = torch.tensor(batch["cand_grades"][i])
    cands = flat[index]  # (Q, C, D)
    scores = torch.einsum("qd,qcd->qc", q, cands)  # (Q, C)
    l_roar = roar_loss(scores, grades, valid, tau=cfg.loss.tau, beta=cfg.loss.beta,
                       gamma=cfg.loss.gamma)
    metrics = {"roar_loss": l_roar.item()}
    loss = l_roar
    top = torch.tensor(batch["top_index"])  # (Q,)
    has_top = top >= 0
    if cfg.loss.lam > 0 and has_top.any():
        keys = torch.tensor([k for ks in batch["cand_keys"] for k in ks])  # (N,)
        groups = torch.tensor([k for ks in batch["cand_group_keys"] for k in ks])  # (N,)
        rows = torch.nonzero(has_top).squeeze(1)  # queries with a positive top group
        positive = torch.tensor(offsets[:-1])[rows] + top[rows]  # (B',)
        same_group = groups[None, :] == groups[positive][:, None] if cfg.loss.catalog_rule else None
        known = (_known_positive(keys, [batch["query_pos_keys"][i] for i in rows.tolist()])
                 if cfg.loss.label_rule else None)
        out = masked_contrastive_loss(q[rows], flat, positive, tau=cfg.loss.tau,
                                      margin=cfg.loss.margin, same_group=same_group,
                                      known_positive=known)
        loss = loss + cfg.loss.lam * out.loss
        metrics |= {"contrastive_loss": out.loss.item(),
                    "masked_fraction": out.masked_fraction.item()}
    metrics["loss"] = loss.item()
    return loss, metrics


STEPS = {"contrastive": contrastive_step, "roar": roar_step}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then linear decay to zero at max_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, o.max_steps - o.warmup_steps)
    return o.lr * max(0.0, 1 - (step - o.warmup_steps) / span)


def _columns(batch: pa.Table) -> dict[str, list]:
    return {name: batch[name].to_pylist() for name in batch.column_names}


def _model_id(model: DualEncoder) -> str:
    """Cheap identity of the starting weights (recorded in every checkpoint's metadata)."""
    digest = hashlib.sha256()
    for tensor in model.backbone.state_dict().values():
        digest.update(tensor.detach().float().flatten()[:256].numpy().tobytes())
    return f"{model.settings.base or 'model'}-{digest.hexdigest()[:12]}"


def _load_init(model_cfg: Any) -> DualEncoder:
    init = Path(model_cfg.init)
    if (init / MODEL_DIR / "config.json").is_file():  # a checkpoint folder: use its model
        init = init / MODEL_DIR
    src = str(init) if init.exists() else model_cfg.init
    model = DualEncoder.from_pretrained(
        src, pooling=model_cfg.pooling, query_instruction=model_cfg.query_instruction,
        max_query_length=model_cfg.max_query_length,
        max_product_length=model_cfg.max_product_length,
    )
    for name, param in model.backbone.named_parameters():
        if name.startswith("pooler."):  # BERT's pooler is not used by our pooling: keep it frozen
            param.requires_grad_(False)
    return model


def _quiet_report_lines() -> None:
    """Ray Train logs every report at INFO under a file-path logger name; our step lines
    already carry the metrics, so keep that logger to warnings."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["cfg"]`` is a TrainConfig as a plain dict."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    _quiet_report_lines()
    if not log.handlers:  # a Train worker has no logging set up; step lines go to its stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))

    model = _load_init(cfg.model)
    init_id = _model_id(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    step, epoch, batch_in_epoch = 0, 0, 0
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resume: a restarted worker group or a rerun of the same name
        with checkpoint.as_directory() as folder:
            resumed = DualEncoder.from_pretrained(Path(folder) / MODEL_DIR)
            model.backbone.load_state_dict(resumed.backbone.state_dict())
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            step, epoch = int(state["step"]), int(state["epoch"])
            batch_in_epoch = int(state["batch_in_epoch"])
            resumed_from = step
    forward = ray.train.torch.prepare_model(model)  # DDP across workers (gloo on CPU)
    device = next(model.parameters()).device
    run_step = STEPS[cfg.stage]
    shard = ray.train.get_dataset_shard("train")

    def report(metrics: dict[str, float], save: bool) -> None:
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                model.save(Path(tmp) / MODEL_DIR, {"stage": cfg.stage, "step": step,
                                                   "run": cfg.run.name, "init": cfg.model.init,
                                                   "init_model_id": init_id})
                torch.save({"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                            "batch_in_epoch": batch_in_epoch}, Path(tmp) / STATE_FILE)
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    if step >= cfg.optim.max_steps:  # a finished run rerun under its name: nothing to do
        report({"step": step, "epoch": epoch, "resumed_from_step": resumed_from}, save=True)
        return

    model.train()
    window_start, window_samples = time.perf_counter(), 0
    while step < cfg.optim.max_steps:
        batches, skip = 0, batch_in_epoch  # a resumed epoch skips the batches it has seen
        for batch in shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="pyarrow",
                                        drop_last=True):
            batches += 1
            if skip:
                skip -= 1
                continue
            batch_in_epoch += 1
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=cfg.optim.precision == "bf16"):
                loss, metrics = run_step(model, forward, _columns(batch), cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            window_samples += batch.num_rows * world
            last = step >= cfg.optim.max_steps
            save = last or step % cfg.run.checkpoint_every == 0
            if save or step % cfg.run.log_every == 0:
                elapsed = time.perf_counter() - window_start
                metrics |= {"step": step, "epoch": epoch, "lr": lr,
                            "resumed_from_step": resumed_from,
                            "samples_per_s": window_samples / max(elapsed, 1e-9)}
                if rank == 0:  # through logging: Ray Train tees print() into its log twice
                    log.info("[%s] step %d/%d %s", cfg.stage, step, cfg.optim.max_steps,
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
        epoch, batch_in_epoch = epoch + 1, 0
