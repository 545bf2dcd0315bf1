"""Training the cross-encoder reranker on Ray Train (the body of ``train_jobs.rerank``).

The same data, splits and grade scale as the dual encoder's two stages: per training query one
list of (query, product) pairs, its judged products (every grade) and mined hard negatives
(``data_jobs.mine_negatives``: the dual encoder's ranks 10–50, minus judged products and
variants of positives) at the scale's lowest gain, scored in one sequence each and trained
with the graded listwise loss (``losses.graded_listwise``). The loop, checkpoints, restarts
and step reports are the dual encoder's (``training.loop.run_steps``); the model folder is
published whole at ``output_dir`` with a model card.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import from_dict, to_dict
from retrieval_platform.encoder.backbones import BACKBONES, backbone_spec
from retrieval_platform.encoder.card import HUB_IDS
from retrieval_platform.encoder.model import model_location, resolve_precision
from retrieval_platform.errors import PlatformError
from retrieval_platform.io import write_json
from retrieval_platform.losses.graded_listwise import graded_listwise_loss
from retrieval_platform.reranker.model import CrossEncoder
from retrieval_platform.tracking import TrackingConfig, log_training
from retrieval_platform.training.checkpoint import init_source, restore, save_and_report
from retrieval_platform.training.config import OptimConfig, RunConfig, ScalingConfig
from retrieval_platform.training.examples import sample_keeping_grades
from retrieval_platform.training.loop import log_to_stderr, run_steps
from retrieval_platform.training.mining import read_negatives
from retrieval_platform.training.trainer import check_examples, fit, published_model

log = logging.getLogger(__name__)


@dataclass
class RerankModelConfig:
    init: str = "minilm-l6"  # backbone name (a fresh score head) or a reranker folder
    max_length: int | None = None  # tokens of a (query, product) sequence (None: 96)
    num_layers: int | None = None  # keep the first N layers: latency at serving time


@dataclass
class RerankDataConfig:
    prepared_dir: str = "runs/data/synthetic"
    split: str = "train"
    negatives_path: str | None = None  # Parquet from data_jobs.mine_negatives
    list_size: int = 16  # pairs per query's list, judged first (every grade keeps one)
    mined_per_query: int = 6  # mined hard negatives in a list (at the lowest gain)


@dataclass
class RerankLossConfig:
    target_tau: float = 0.2  # τ_t of the targets softmax(gain / τ_t) (losses/graded_listwise)


@dataclass
class RerankConfig:
    stage: Literal["rerank"] = "rerank"
    model: RerankModelConfig = field(default_factory=RerankModelConfig)
    data: RerankDataConfig = field(default_factory=RerankDataConfig)
    # batch_size: queries (lists) per worker; length_bucket and grad_cache do not apply
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, batch_size=8))
    loss: RerankLossConfig = field(default_factory=RerankLossConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="rerank"))
    output_dir: str = "runs/models/rerank"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def rerank_examples(ds: PreparedDataset, *, split: str = "train", list_size: int = 16,
                    negatives_path: str | None = None, mined_per_query: int = 6,
                    seed: int = 0) -> pa.Table:
    """One row per judged query of ``split``, shuffled with ``seed``: ``query_text``,
    ``cand_ids``, ``cand_texts`` and ``cand_gains`` (NDCG gains of the grades; mined
    products: the lowest grade's gain). A list holds at most ``list_size - mined`` judged
    products (sampled so that every grade present keeps one) and ``mined_per_query`` mined
    negatives that are neither judged nor variants of a positive; lists with one gain only are
    skipped (nothing to order)."""
    if list_size < 2:
        raise PlatformError("data.list_size must be >= 2")
    scale = ds.scale
    products = ds.products(["product_id", "text", "variant_group"])
    text = dict(zip(products["product_id"].to_pylist(), products["text"].to_pylist(),
                    strict=True))
    group = dict(zip(products["product_id"].to_pylist(),
                     products["variant_group"].to_pylist(), strict=True))
    qtext = ds.query_texts(split)
    mined = read_negatives(negatives_path) if mined_per_query else {}
    low = float(scale.gain(scale.min_grade))
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = defaultdict(list)
    for qid, judged in sorted(ds.qrels(split).items()):
        pos_groups = {group[p] for p, g in judged.items() if g >= scale.positive_threshold}
        extra = [n for n in mined.get(qid, []) if n not in judged
                 and group.get(n) not in pos_groups][:min(mined_per_query, list_size - 1)]
        cands = [(p, g) for p, g in judged.items() if p in text]
        room = list_size - len(extra)
        if len(cands) > room:
            cands = sample_keeping_grades(cands, room, rng)
        gains = [float(scale.gain(g)) for _, g in cands] + [low] * len(extra)
        if len(set(gains)) < 2:
            continue
        rows["query_id"].append(qid)
        rows["query_text"].append(qtext[qid])
        rows["cand_ids"].append([p for p, _ in cands] + extra)
        rows["cand_texts"].append([text[p] for p, _ in cands] + [text[n] for n in extra])
        rows["cand_gains"].append(gains)
    if not rows:
        raise PlatformError(f"{ds.location}: no {split} query has products of two gains; "
                            "nothing for the reranker to order")
    table = pa.table(rows)
    return table.take(rng.permutation(table.num_rows))


def padded(values: list[list[float]], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists as a (Q, L) tensor and its (Q, L) mask of real entries."""
    width = max(len(v) for v in values)
    out = torch.full((len(values), width), fill)  # (Q, L)
    mask = torch.zeros((len(values), width), dtype=torch.bool)  # (Q, L)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v)
        mask[i, : len(v)] = True
    return out, mask


def rerank_step(cfg: RerankConfig, model: CrossEncoder, forward: Any,
                optimizer: torch.optim.Optimizer, columns: dict[str, list], lr: float,
                bf16: bool) -> dict[str, float]:
    """One optimizer step of the graded listwise loss over this worker's lists (each worker's
    loss is over its own lists; DDP averages the gradients)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    lists = columns["cand_texts"]
    queries = [q for q, cands in zip(columns["query_text"], lists, strict=True) for _ in cands]
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        flat = model.logits(queries, [t for cands in lists for t in cands], forward)  # (P,)
    gains, mask = padded(columns["cand_gains"])  # (Q, L)
    scores = torch.full(gains.shape, 0.0, device=flat.device).masked_scatter(
        mask.to(flat.device), flat)  # (Q, L), row-major as flattened
    loss = graded_listwise_loss(scores, gains.to(flat.device), mask.to(flat.device),
                                cfg.loss.target_tau)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    with torch.no_grad():  # does the list's top-scored product have its best gain?
        best = gains.masked_fill(~mask, -1.0).max(dim=1).values  # (Q,)
        top = scores.detach().cpu().masked_fill(~mask, -torch.inf).argmax(dim=1)  # (Q,)
        top_is_best = (gains[torch.arange(len(top)), top] == best).float().mean()
    return {"loss": float(loss.detach()), "top1_best_gain": float(top_is_best)}


def load_reranker(model_cfg: RerankModelConfig) -> CrossEncoder:
    return CrossEncoder.from_pretrained(init_source(model_cfg.init),
                                        max_length=model_cfg.max_length,
                                        num_layers=model_cfg.num_layers)


def rerank_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config["cfg"]`` is a RerankConfig as a plain dict."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(RerankConfig, config["cfg"])  # parse
    log_to_stderr()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed)  # one fresh head on every worker (DDP broadcasts anyway)
    torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))

    model = load_reranker(cfg.model)  # build
    progress = restore(model, ray.train.get_checkpoint())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    if progress.optimizer_state is not None:
        optimizer.load_state_dict(progress.optimizer_state)
    forward = ray.train.torch.prepare_model(model)  # DDP across workers (gloo on CPU)
    device = next(model.parameters()).device
    bf16 = resolve_precision(cfg.optim.precision, device.type) == "bf16"

    def report(metrics: dict[str, float], save: bool) -> None:
        save_and_report(model, optimizer, progress, metrics, {
            "stage": "rerank", "step": progress.step, "run": cfg.run.name,
            "init": cfg.model.init}, save)

    if progress.step >= cfg.optim.max_steps:  # a finished run rerun under its name
        report({"step": progress.step, "epoch": progress.epoch,
                "resumed_from_step": progress.resumed_from}, save=True)
        return
    model.train()  # run
    run_steps(cfg, model, forward, optimizer, progress, report, rank, world, bf16, rerank_step)


def train_reranker(cfg: RerankConfig) -> dict[str, Any]:
    """Train the reranker; its folder is published atomically at ``cfg.output_dir``."""
    cfg.model.init = model_location(cfg.model.init)
    if cfg.model.init in BACKBONES:  # build a converted backbone once, before the workers
        backbone_spec(cfg.model.init).resolve()
    d = cfg.data
    examples = rerank_examples(PreparedDataset(d.prepared_dir), split=d.split,
                               list_size=d.list_size, negatives_path=d.negatives_path,
                               mined_per_query=d.mined_per_query, seed=cfg.run.seed)
    check_examples(examples, cfg)
    result = fit(rerank_loop_per_worker, {"cfg": to_dict(cfg)}, examples, cfg.scaling, cfg.run)
    with published_model(result, cfg.output_dir) as (tmp, metrics, history):
        write_json(tmp / "training.json", {
            "stage": "rerank", "checkpoint": result.checkpoint.path, "final_metrics": metrics,
            "examples": examples.num_rows, "config": to_dict(cfg), "history": history,
        })
        write_reranker_card(tmp, cfg, examples.num_rows, metrics)
        log_training(cfg.tracking, "rerank", cfg.run.name, to_dict(cfg), history, metrics,
                     tmp, location=storage.canonical(cfg.output_dir))
    log.info("rerank done: model at %s (%s)", cfg.output_dir, json.dumps(metrics))
    return {"model_dir": storage.canonical(cfg.output_dir),
            "checkpoint": result.checkpoint.path, "metrics": metrics}


def write_reranker_card(folder: Any, cfg: RerankConfig, lists: int,
                        metrics: dict[str, Any]) -> None:
    """README.md of a reranker folder, readable on the Hugging Face Hub as it is."""
    base = HUB_IDS.get(cfg.model.init, cfg.model.init)
    o = cfg.optim
    lines = [
        "---", "library_name: sentence-transformers", "pipeline_tag: text-ranking",
        f"base_model: {base}", "tags: [cross-encoder, reranker, product-search]", "---", "",
        "# Product-search reranker (cross-encoder)", "",
        "Query and product text in one sequence, one score (a logit: higher is more relevant),",
        "trained by retrieval-platform (`train_jobs.rerank`) with a graded listwise loss",
        f"(ListNet, targets softmax(gain / {cfg.loss.target_tau:g})) over each training query's "
        "judged products",
        f"and {cfg.data.mined_per_query} mined hard negatives.", "",
        "| | |", "|---|---|",
        f"| base | {base} |", f"| layers kept | {cfg.model.num_layers or 'all'} |",
        f"| data | {cfg.data.prepared_dir} (split {cfg.data.split}, {lists} lists) |",
        f"| budget | {o.max_steps} steps x {o.batch_size} lists x "
        f"{cfg.scaling.num_workers} workers, lr {o.lr:g} |",
        f"| final step metrics | {json.dumps({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})} |",  # noqa: E501
        "", "## Use", "", "```python", "from sentence_transformers import CrossEncoder", "",
        'model = CrossEncoder("PATH/TO/THIS/FOLDER")',
        'scores = model.predict([("cordless drill", "DEWALT 20V MAX Cordless Drill ...")])',
        "```", "",
        "Served behind the retrieval platform's endpoint with `reranker:` in the app's args; "
        "`\"rerank\": true` in a search request.", "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
