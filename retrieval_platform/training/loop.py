"""The per-worker training loop of both stages (runs inside Ray Train's TorchTrainer).

Both stages compute their loss on the global batch: every worker all-gathers the queries and
candidates of all workers (its own slice keeps its gradient) and evaluates the whole batch's
loss, so the gradient DDP averages is that of one batch of world × B examples.
Stage 1: Eq. 1–3. Stage 2: Eq. 7 = L₁ + β · L_align (Eq. 4–6), ROAR's softmax over every
candidate of the batch.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from retrieval_platform import storage
from retrieval_platform.config import from_dict
from retrieval_platform.encoder.lora import add_lora
from retrieval_platform.encoder.model import (
    DualEncoder,
    length_chunks,
    resolve_precision,
    truncate,
)
from retrieval_platform.errors import PlatformError
from retrieval_platform.losses import masked_contrastive_loss, roar_loss, roar_objective
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.examples import sample_negatives

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
HISTORY_FILE = "history.json"


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (sizes may differ between workers); the local slice keeps its
    gradient, the others are constants. Every worker so holds the whole global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[: int(n.item())] for p, n in zip(parts, sizes, strict=True)]
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _padded(rows: list[list[int]], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0) or 1
    values = torch.full((len(rows), width), fill, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return values, valid


def _gather_rows(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Every worker's per-query key lists, as one padded (B_all, P) tensor (−1 = padding)."""
    values, valid = _padded(rows)
    values = values.masked_fill(~valid, -1).to(device)  # NCCL gathers device tensors only
    _, world = _world()
    if world > 1:  # widths differ between workers: pad to the widest first
        width = torch.tensor([values.shape[1]], device=device)
        widths = [torch.zeros_like(width) for _ in range(world)]
        dist.all_gather(widths, width)
        widest = int(max(w.item() for w in widths))
        values = torch.nn.functional.pad(values, (0, widest - values.shape[1]), value=-1)
    return gather_with_grad(values)


def _known_positive(cand_keys: torch.Tensor, pos_keys: torch.Tensor) -> torch.Tensor:
    """(B, N): candidate j is a labelled positive of query i (METHOD.md Eq. 2, label rule);
    ``pos_keys`` (B, P) padded with −1."""
    hit = cand_keys[None, :, None] == pos_keys[:, None, :]  # (B, N, P)
    return (hit & (pos_keys[:, None, :] != -1)).any(-1)  # (B, N)


def _masked_l1(q: torch.Tensor, c: torch.Tensor, positive: torch.Tensor,
               cand_keys: torch.Tensor, cand_groups: torch.Tensor, pos_keys: torch.Tensor,
               cfg: TrainConfig):
    """Eq. 1–3 with the catalog and label rules built from keys (all tensors global)."""
    same_group = (cand_groups[None, :] == cand_groups[positive][:, None]  # (B, N)
                  if cfg.loss.catalog_rule else None)
    known = _known_positive(cand_keys, pos_keys) if cfg.loss.label_rule else None
    return masked_contrastive_loss(q, c, positive, tau=cfg.loss.tau, margin=cfg.loss.margin,
                                   same_group=same_group, known_positive=known)


def matryoshka_dims(cfg: TrainConfig, full: int) -> list[int | None]:
    """The dimensions the losses are summed over: the full one (None) and each smaller
    Matryoshka size (equal weights)."""
    smaller = {d for d in cfg.loss.matryoshka_dims or () if 0 < d < full}
    return [None, *sorted(smaller, reverse=True)]


def global_contrastive_loss(q_local: torch.Tensor, c_local: torch.Tensor, keys: torch.Tensor,
                            groups: torch.Tensor, query_pos_keys: list[list[int]],
                            cfg: TrainConfig):
    """Eq. 1–3 on the global batch from this worker's part: ``q_local`` (B, D) queries,
    ``c_local`` (B + ΣH, D) candidates whose first B are the queries' positives, their product
    and variant-group keys, and each query's labelled positives. Every worker gathers all queries
    and candidates (its own keep their gradient) and returns the whole batch's loss times the
    world size: DDP's average of the workers' gradients is then the global loss's gradient."""
    _, world = _world()
    B, device = q_local.shape[0], q_local.device  # every tensor on the embeddings' device
    q = gather_with_grad(q_local)  # (B_all, D)
    c = gather_with_grad(c_local)  # (N, D)
    all_keys = gather_with_grad(keys.to(device))  # (N,)
    all_groups = gather_with_grad(groups.to(device))  # (N,)
    n_cands = gather_with_grad(torch.tensor([c_local.shape[0]], device=device))  # (world,)
    n_queries = gather_with_grad(torch.tensor([B], device=device))  # (world,)
    starts = torch.cumsum(n_cands, 0) - n_cands  # (world,)
    positive = torch.cat([starts[r] + torch.arange(int(n_queries[r]), device=device)
                          for r in range(world)])
    pos_keys = _gather_rows(query_pos_keys, device)  # (B_all, P)
    outs = [_masked_l1(truncate(q, d), truncate(c, d), positive, all_keys, all_groups, pos_keys,
                       cfg) for d in matryoshka_dims(cfg, q.shape[1])]
    return sum(o.loss for o in outs) * world, outs[0]  # metrics: the full dimension


def embed_bucketed(model: DualEncoder, forward: Any, texts: list[str], kind: str,
                   bucket: int) -> torch.Tensor:
    """(N, D) embeddings with gradients, in ``texts``' order: the texts sorted by length and
    embedded ``bucket`` at a time, each chunk padded only to its own longest text. The vectors
    (and so the loss) equal one padded pass's; the padding, most of a batch of short product
    titles next to a few long ones, is not computed. ``bucket`` 0: one pass."""
    device = next(model.parameters()).device

    def embed(batch: list[str]) -> torch.Tensor:
        return forward(**{k: v.to(device) for k, v in model.tokenize(batch, kind).items()})

    if not bucket or len(texts) <= bucket:
        return embed(texts)  # (N, D)
    chunks = length_chunks(texts, bucket)
    parts = [embed([texts[i] for i in idx]) for idx in chunks]
    inverse = torch.empty(len(texts), dtype=torch.long, device=device)
    inverse[torch.tensor([i for idx in chunks for i in idx], device=device)] = torch.arange(
        len(texts), device=device)
    return torch.cat(parts)[inverse]  # (N, D)


def contrastive_step(model: DualEncoder, forward: Any, batch: dict[str, list],
                     cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1–3 on one batch of pairs; candidates = all positives and negatives of all workers."""
    texts = list(batch["pos_text"]) + [t for negs in batch["neg_texts"] for t in negs]
    bucket = cfg.optim.length_bucket
    q_local = embed_bucketed(model, forward, list(batch["query_text"]), "query", bucket)  # (B, D)
    c_local = embed_bucketed(model, forward, texts, "product", bucket)  # (B + ΣH, D)
    keys = torch.tensor(list(batch["pos_key"]) + [k for ks in batch["neg_keys"] for k in ks])
    groups = torch.tensor(list(batch["pos_group_key"])
                          + [k for ks in batch["neg_group_keys"] for k in ks])
    loss, out = global_contrastive_loss(q_local, c_local, keys, groups,
                                        list(batch["query_pos_keys"]), cfg)
    return loss, {
        "loss": out.loss.item(), "masked_fraction": out.masked_fraction.item(),
        "margin_masked_fraction": out.margin_masked_fraction.item(),
        "known_masked_fraction": out.known_masked_fraction.item(),
        "in_batch_accuracy": out.accuracy.item()}


def roar_step(model: DualEncoder, forward: Any, batch: dict[str, list],
              cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 7 on the global batch: L₂ = L₁ + β · L_align, where row i of ROAR's softmax (Eq. 4)
    and L₁'s candidates are every candidate of every worker, and L₁'s positive is the query's
    top-grade product (queries whose top grade is below the positive threshold have none)."""
    rank, world = _world()
    counts = [len(c) for c in batch["cand_texts"]]
    extras = [len(c) for c in batch.get("extra_texts", [[] for _ in counts])]
    texts: list[str] = []
    keys: list[int] = []
    groups: list[int] = []
    owner: list[int] = []  # the local query whose graded candidate this is (−1: ungraded)
    grade: list[float] = []
    for i in range(len(counts)):
        texts += batch["cand_texts"][i]
        keys += batch["cand_keys"][i]
        groups += batch["cand_group_keys"][i]
        owner += [i] * counts[i]
        grade += batch["cand_grades"][i]
        if extras[i]:
            texts += batch["extra_texts"][i]
            keys += batch["extra_keys"][i]
            groups += batch["extra_group_keys"][i]
            owner += [-1] * extras[i]
            grade += [0.0] * extras[i]
    bucket = cfg.optim.length_bucket
    q_local = embed_bucketed(model, forward, list(batch["query_text"]), "query", bucket)  # (Q, D)
    c_local = embed_bucketed(model, forward, texts, "product", bucket)  # (N_local, D)
    starts_local = np.concatenate([[0], np.cumsum(np.add(counts, extras))[:-1]])
    top = [int(starts_local[i]) + t if t >= 0 else -1 for i, t in enumerate(batch["top_index"])]

    device = q_local.device  # every tensor on the embeddings' device (NCCL needs it)
    q = gather_with_grad(q_local)  # (Q_all, D)
    c = gather_with_grad(c_local)  # (N, D)
    n_local = torch.tensor([c_local.shape[0]], device=device)
    q_local_n = torch.tensor([q_local.shape[0]], device=device)
    c_sizes, q_sizes = gather_with_grad(n_local), gather_with_grad(q_local_n)  # (world,) each
    c_start = torch.cumsum(c_sizes, 0) - c_sizes  # (world,) offsets: one gather each, not two
    q_start = torch.cumsum(q_sizes, 0) - q_sizes
    # Global owner query and top positive of every candidate / query.
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    owner_t = torch.where(owner_t >= 0, owner_t + q_start[rank], owner_t)
    all_owner = gather_with_grad(owner_t)  # (N,)
    top_t = torch.tensor(top, dtype=torch.long, device=device)
    top_t = torch.where(top_t >= 0, top_t + c_start[rank], top_t)
    all_top = gather_with_grad(top_t)  # (Q_all,)
    all_grade = gather_with_grad(torch.tensor(grade, dtype=torch.float32, device=device))  # (N,)
    all_keys = gather_with_grad(torch.tensor(keys, dtype=torch.long, device=device))  # (N,)
    all_groups = gather_with_grad(torch.tensor(groups, dtype=torch.long, device=device))  # (N,)

    pos_keys = _gather_rows(list(batch["query_pos_keys"]), device)  # (Q_all, P)
    loss, metrics = None, {}
    for d in matryoshka_dims(cfg, q.shape[1]):  # metrics: the full dimension (the first)
        loss_d, metrics_d = _stage2_loss(truncate(q, d), truncate(c, d), all_owner, all_grade,
                                         all_top, all_keys, all_groups, pos_keys, cfg)
        loss, metrics = (loss_d, metrics_d) if loss is None else (loss + loss_d, metrics)
    metrics["loss"] = loss.item()
    return loss * world, metrics


def _stage2_loss(q: torch.Tensor, c: torch.Tensor, owner: torch.Tensor, grade: torch.Tensor,
                 top: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor,
                 pos_keys: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Eq. 7 on global tensors: q (Q, D), c (N, D); ``owner`` (N,) the query whose graded
    candidate c_j is (−1: none), ``grade`` (N,), ``top`` (Q,) each query's L₁ positive (−1:
    none), the candidates' product and group keys, and each query's labelled positives."""
    Q = q.shape[0]
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ c.float().T  # (Q, N)
    graded = owner[None, :] == torch.arange(Q, device=owner.device)[:, None]  # (Q, N)
    grades = grade[None, :].expand(Q, -1)  # (Q, N)
    l_align = roar_loss(scores, grades, graded, tau=cfg.loss.tau_align, gamma=cfg.loss.gamma)
    metrics = {"align_loss": l_align.item()}
    rows = torch.nonzero(top >= 0).squeeze(1)  # queries with a positive top group
    if rows.numel():
        out = _masked_l1(q[rows], c, top[rows], keys, groups, pos_keys[rows], cfg)
        l1 = out.loss
        metrics |= {"contrastive_loss": l1.item(), "masked_fraction": out.masked_fraction.item(),
                    "in_batch_accuracy": out.accuracy.item()}
    else:
        l1 = scores.sum() * 0.0
    return roar_objective(l1, l_align, beta=cfg.loss.beta), metrics


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


def init_source(init: str) -> str:
    """A backbone name or model folder as given (a storage URI: this node's copy of it); a Ray
    Train checkpoint folder: its model."""
    if storage.is_remote(init):
        init = str(storage.fetch(init))
    if (Path(init) / MODEL_DIR / "config.json").is_file():
        return str(Path(init) / MODEL_DIR)
    return init


def _load_init(model_cfg: Any) -> DualEncoder:
    src = init_source(model_cfg.init)
    overrides = {k: v for k, v in asdict(model_cfg).items() if k not in ("init", "lora")}
    model = DualEncoder.from_pretrained(src, **overrides)
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


def _log_to_stderr() -> None:
    """A Train worker has no logging set up; step lines go to its stderr."""
    _quiet_report_lines()
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@dataclass
class _Progress:
    """Where a run is: restored from a checkpoint, saved into the next one."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # the training curve
    optimizer_state: dict[str, Any] | None = None


def _restore(model: DualEncoder, checkpoint: Any) -> _Progress:
    """Load a checkpoint's weights into ``model`` (a restarted worker group, or a rerun of the
    same run name) and return its progress; a fresh run starts at step 0."""
    if checkpoint is None:
        return _Progress()
    with checkpoint.as_directory() as folder:
        resumed = DualEncoder.from_pretrained(Path(folder) / MODEL_DIR)
        model.backbone.load_state_dict(resumed.backbone.state_dict())
        state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
        history_file = Path(folder) / HISTORY_FILE
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
    step = int(state["step"])
    log.info("resumed from step %d (checkpoint %s)", step, checkpoint.path)
    return _Progress(step, int(state["epoch"]), int(state["batch_in_epoch"]), step, history,
                     state["optimizer"])


def _report(cfg: TrainConfig, model: DualEncoder, optimizer: torch.optim.Optimizer,
            progress: _Progress, metrics: dict[str, float], init_id: str, save: bool) -> None:
    """Report ``metrics`` to Ray Train; with ``save``, rank 0 attaches a checkpoint: the model
    folder, the optimizer and progress, the metrics and the history so far."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            model.save(Path(tmp) / MODEL_DIR, {
                "stage": cfg.stage, "step": progress.step, "run": cfg.run.name,
                "init": cfg.model.init, "init_model_id": init_id,
                # the dimensions this model serves well (full first)
                "matryoshka_dims": [model.dim, *[d for d in matryoshka_dims(cfg, model.dim)
                                                 if d]]})
            torch.save({"optimizer": optimizer.state_dict(), "step": progress.step,
                        "epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch},
                       Path(tmp) / STATE_FILE)
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(progress.history))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _step_columns(batch: pa.Table, cfg: TrainConfig, epoch: int, step: int,
                  rank: int) -> dict[str, list]:
    """A batch as columns, with stage 1's negatives drawn afresh from each row's pool (seeded
    by run, epoch, step and rank: resumable and repeatable)."""
    columns = _columns(batch)
    if cfg.stage == "contrastive" and cfg.data.hard_negatives:
        rng = np.random.default_rng([cfg.run.seed, epoch, step, rank])
        columns = sample_negatives(columns, cfg.data.hard_negatives, rng)
    elif cfg.stage == "contrastive":
        columns |= {k: [[] for _ in columns["query_text"]]
                    for k in ("neg_texts", "neg_keys", "neg_group_keys")}
    return columns


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["cfg"]`` is a TrainConfig as a plain dict,
    ``config["init_model_id"]`` the starting weights' id (``model_info``), recorded in every
    checkpoint.
    Set up (model, resumed progress, optimizer, DDP), then train until ``max_steps``."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    _log_to_stderr()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))

    model = _load_init(cfg.model)
    init_id = config.get("init_model_id", "")
    progress = _restore(model, ray.train.get_checkpoint())
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
        _report(cfg, model, optimizer, progress, metrics, init_id, save)

    if progress.step >= cfg.optim.max_steps:  # a finished run rerun under its name
        report({"step": progress.step, "epoch": progress.epoch,
                "resumed_from_step": progress.resumed_from}, save=True)
        return
    model.train()
    _train(cfg, model, forward, optimizer, progress, report, rank, world, bf16)


def _train(cfg: TrainConfig, model: DualEncoder, forward: Any,
           optimizer: torch.optim.Optimizer, progress: _Progress, report: Any, rank: int,
           world: int, bf16: bool) -> None:
    """Epochs over this worker's shard until ``max_steps``: a step, then every ``log_every``
    steps a report (with a checkpoint every ``checkpoint_every`` and at the end)."""
    import ray.train

    run_step = STEPS[cfg.stage]
    device_type = next(model.parameters()).device.type
    shard = ray.train.get_dataset_shard("train")
    p = progress
    window_start, window_samples = time.perf_counter(), 0
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
            for group in optimizer.param_groups:
                group["lr"] = lr
            columns = _step_columns(batch, cfg, p.epoch, p.step, rank)
            # bf16 autocast covers the backbone; scores and losses run in float32 (losses/).
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss, metrics = run_step(model, forward, columns, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            p.step += 1
            window_samples += batch.num_rows * world
            last = p.step >= cfg.optim.max_steps
            save = last or p.step % cfg.run.checkpoint_every == 0
            if save or p.step % cfg.run.log_every == 0:
                elapsed = time.perf_counter() - window_start
                metrics |= {"step": p.step, "epoch": p.epoch, "lr": lr,
                            "resumed_from_step": p.resumed_from,
                            "samples_per_s": window_samples / max(elapsed, 1e-9)}
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
