"""The training objectives of both stages, assembled on the global batch: the losses of
:mod:`retrieval_platform.losses` (pure functions on embeddings) fed with every worker's queries
and candidates (:mod:`retrieval_platform.training.distributed`) and the keys Eq. 2's masks need.

Stage 1 (:func:`stage1_objective`): Eq. 1–3. Stage 2 (:func:`stage2_objective`): Eq. 7 =
L₁ + β · L_align (Eq. 4–6), ROAR's softmax over every candidate of the batch, and with a
teacher, + λ · L_KD (losses/listwise_distillation.py) over each query's scored list. Each is summed
over the Matryoshka dimensions (METHOD.md "Encoder"), and returned times the world size, so
that DDP's average of the workers' gradients is the global loss's gradient. An objective is the
texts to embed and the loss on their embeddings (:class:`Objective`): how the embeddings are
made, one graph or gradient-cached chunks, is :mod:`retrieval_platform.training.grad_cache`'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retrieval_platform.encoder.model import truncate
from retrieval_platform.losses import (
    listwise_distillation_loss,
    masked_contrastive_loss,
    roar_loss,
    roar_objective,
)
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.distributed import (
    gather_rows,
    gather_sizes,
    gather_with_grad,
    offsets,
    world,
)
from retrieval_platform.training.examples import GroupBatch, SampledPairBatch

Metrics = dict[str, float]


@dataclass
class GlobalCandidates:
    """One global batch, gathered from every worker: the queries, every candidate of the batch
    (the softmax of each query's row) and what the masks and the ROAR groups need."""

    queries: torch.Tensor  # (Q, D)
    candidates: torch.Tensor  # (N, D)
    keys: torch.Tensor  # (N,) product key of each candidate
    groups: torch.Tensor  # (N,) variant-group key of each candidate
    positive_keys: torch.Tensor  # (Q, P) each query's labelled positives, −1 padded
    top: torch.Tensor  # (Q,) index of each query's L₁ positive among the candidates (−1: none)
    owner: torch.Tensor | None = None  # (N,) stage 2: the query a graded candidate is of (−1)
    grade: torch.Tensor | None = None  # (N,) stage 2: its group grade
    list_owner: torch.Tensor | None = None  # (N,) stage 2: the query whose list it is in
    teacher: torch.Tensor | None = None  # (N,) stage 2: the teacher's score of it (NaN: none)

    def at_dim(self, d: int | None) -> GlobalCandidates:
        """The batch with queries and candidates cut to their first ``d`` dimensions,
        renormalised (Matryoshka); ``None``: as it is."""
        return dataclasses.replace(self, queries=truncate(self.queries, d),
                                   candidates=truncate(self.candidates, d))


def known_positive(cand_keys: torch.Tensor, pos_keys: torch.Tensor) -> torch.Tensor:
    """(B, N): candidate j is a labelled positive of query i (METHOD.md Eq. 2, label rule);
    ``pos_keys`` (B, P) padded with −1."""
    hit = cand_keys[None, :, None] == pos_keys[:, None, :]  # (B, N, P)
    return (hit & (pos_keys[:, None, :] != -1)).any(-1)  # (B, N)


def masked_l1(batch: GlobalCandidates, cfg: TrainConfig, rows: torch.Tensor | None = None,
              labelled: torch.Tensor | None = None):
    """Eq. 1–3 for the queries ``rows`` (default: all) against every candidate, with the catalog
    and label rules built from the keys; each query's positive is ``batch.top``. ``labelled``
    (B, N): the products judged for each of those queries, spared by the margin rule."""
    q, positive, pos_keys = batch.queries, batch.top, batch.positive_keys
    if rows is not None:
        q, positive, pos_keys = q[rows], positive[rows], pos_keys[rows]
    same_group = (batch.groups[None, :] == batch.groups[positive][:, None]  # (B, N)
                  if cfg.loss.catalog_rule else None)
    known = known_positive(batch.keys, pos_keys) if cfg.loss.label_rule else None
    return masked_contrastive_loss(q, batch.candidates, positive, tau=cfg.loss.tau,
                                   margin=cfg.loss.margin, same_group=same_group,
                                   known_positive=known, labelled=labelled)


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
    and variant-group keys, and each query's labelled positives. Returns the whole batch's loss
    (summed over the Matryoshka dimensions) times the world size, and the full dimension's
    output for metrics."""
    _, size_of_world = world()
    device = q_local.device  # every tensor on the embeddings' device (NCCL needs it)
    n_cands = gather_sizes(c_local.shape[0], device)  # (world,)
    n_queries = gather_sizes(q_local.shape[0], device)  # (world,)
    starts = offsets(n_cands)  # (world,)
    positive = torch.cat([starts[r] + torch.arange(int(n_queries[r]), device=device)
                          for r in range(size_of_world)])  # (B_all,)
    batch = GlobalCandidates(
        queries=gather_with_grad(q_local), candidates=gather_with_grad(c_local),
        keys=gather_with_grad(keys.to(device)), groups=gather_with_grad(groups.to(device)),
        positive_keys=gather_rows(query_pos_keys, device), top=positive)
    outs = [masked_l1(batch.at_dim(d), cfg) for d in matryoshka_dims(cfg, batch.queries.shape[1])]
    return sum(o.loss for o in outs) * size_of_world, outs[0]  # metrics: the full dimension


@dataclass
class Objective:
    """One step's objective, split where gradient caching needs it: the texts to embed, and
    the loss on their embeddings (:mod:`retrieval_platform.training.grad_cache` runs it with
    or without a cache; either way the loss and its gradients are the same)."""

    texts: list[tuple[list[str], str]]  # each: the texts and their kind ("query" / "product")
    loss_on: Callable[[list[torch.Tensor]], tuple[torch.Tensor, Metrics]]  # embeddings in order


def stage1_objective(batch: SampledPairBatch, cfg: TrainConfig) -> Objective:
    """Eq. 1–3 on one batch of pairs; candidates = all positives and negatives of all workers."""
    texts = list(batch["pos_text"]) + [t for negs in batch["neg_texts"] for t in negs]
    keys = torch.tensor(list(batch["pos_key"]) + [k for ks in batch["neg_keys"] for k in ks])
    groups = torch.tensor(list(batch["pos_group_key"])
                          + [k for ks in batch["neg_group_keys"] for k in ks])

    def loss_on(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        q_local, c_local = embeddings  # (B, D), (B + ΣH, D)
        loss, out = global_contrastive_loss(q_local, c_local, keys, groups,
                                            list(batch["query_pos_keys"]), cfg)
        return loss, {
            "loss": out.loss.item(), "masked_fraction": out.masked_fraction.item(),
            "margin_masked_fraction": out.margin_masked_fraction.item(),
            "known_masked_fraction": out.known_masked_fraction.item(),
            "in_batch_accuracy": out.accuracy.item()}

    return Objective([(list(batch["query_text"]), "query"), (texts, "product")], loss_on)


@dataclass
class _LocalGroups:
    """This worker's stage-2 candidates, flattened: each query's graded ones, then its extras."""

    texts: list[str]
    keys: list[int]
    groups: list[int]
    owner: list[int]  # the local query whose graded candidate this is (−1: ungraded)
    grade: list[float]
    top: list[int]  # each query's L₁ positive among them (−1: none)
    list_owner: list[int]  # the local query whose candidate or extra this is
    teacher: list[float]  # its teacher score (NaN: none, or no teacher)


def _flatten_groups(batch: GroupBatch) -> _LocalGroups:
    out = _LocalGroups([], [], [], [], [], [], [], [])
    counts = [len(c) for c in batch["cand_texts"]]
    extras = [len(c) for c in batch.get("extra_texts", [[] for _ in counts])]
    no_teacher = "cand_teacher" not in batch
    for i in range(len(counts)):
        out.texts += batch["cand_texts"][i]
        out.keys += batch["cand_keys"][i]
        out.groups += batch["cand_group_keys"][i]
        out.owner += [i] * counts[i]
        out.grade += batch["cand_grades"][i]
        out.list_owner += [i] * (counts[i] + extras[i])
        out.teacher += ([math.nan] * counts[i] if no_teacher
                        else list(batch["cand_teacher"][i]))
        if extras[i]:
            out.texts += batch["extra_texts"][i]
            out.keys += batch["extra_keys"][i]
            out.groups += batch["extra_group_keys"][i]
            out.owner += [-1] * extras[i]
            out.grade += [0.0] * extras[i]
            out.teacher += ([math.nan] * extras[i] if no_teacher
                            else list(batch["extra_teacher"][i]))
    starts = np.concatenate([[0], np.cumsum(np.add(counts, extras))[:-1]])
    out.top = [int(starts[i]) + t if t >= 0 else -1 for i, t in enumerate(batch["top_index"])]
    return out


def _gather_groups(q_local: torch.Tensor, c_local: torch.Tensor, local: _LocalGroups,
                   pos_keys: list[list[int]]) -> GlobalCandidates:
    """Every worker's stage-2 batch as one, with owners and tops renumbered globally."""
    rank, _ = world()
    device = q_local.device  # every tensor on the embeddings' device (NCCL needs it)
    c_start = offsets(gather_sizes(c_local.shape[0], device))  # (world,)
    q_start = offsets(gather_sizes(q_local.shape[0], device))  # (world,)

    def global_index(local_index: list[int], start: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(local_index, dtype=torch.long, device=device)
        return gather_with_grad(torch.where(t >= 0, t + start[rank], t))

    def gathered(values: list, dtype: torch.dtype) -> torch.Tensor:
        return gather_with_grad(torch.tensor(values, dtype=dtype, device=device))

    return GlobalCandidates(
        queries=gather_with_grad(q_local), candidates=gather_with_grad(c_local),  # (Q, D) (N, D)
        keys=gathered(local.keys, torch.long), groups=gathered(local.groups, torch.long),
        positive_keys=gather_rows(pos_keys, device),  # (Q, P)
        top=global_index(local.top, c_start),  # (Q,)
        owner=global_index(local.owner, q_start),  # (N,)
        grade=gathered(local.grade, torch.float32),  # (N,)
        list_owner=global_index(local.list_owner, q_start),  # (N,)
        teacher=gathered(local.teacher, torch.float32))  # (N,)


def stage2_objective(batch: GroupBatch, cfg: TrainConfig) -> Objective:
    """Eq. 7 on the global batch: L₂ = L₁ + β · L_align, where row i of ROAR's softmax (Eq. 4)
    and L₁'s candidates are every candidate of every worker, and L₁'s positive is the query's
    top-grade product (queries whose top grade is below the positive threshold have none)."""
    local = _flatten_groups(batch)

    def loss_on(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        q_local, c_local = embeddings  # (Q, D), (N_local, D)
        _, size_of_world = world()
        full = _gather_groups(q_local, c_local, local, list(batch["query_pos_keys"]))
        loss, metrics = None, {}
        for d in matryoshka_dims(cfg, full.queries.shape[1]):  # metrics: the full dimension's
            loss_d, metrics_d = stage2_loss(full.at_dim(d), cfg)
            loss, metrics = (loss_d, metrics_d) if loss is None else (loss + loss_d, metrics)
        metrics["loss"] = loss.item()
        return loss * size_of_world, metrics

    return Objective([(list(batch["query_text"]), "query"), (local.texts, "product")], loss_on)


def stage2_loss(batch: GlobalCandidates, cfg: TrainConfig) -> tuple[torch.Tensor, Metrics]:
    """Eq. 7 on a gathered stage-2 batch: ROAR over each query's graded candidates (``owner``,
    ``grade``) in its row of every candidate, plus L₁ for the queries with a positive top."""
    q, c = batch.queries, batch.candidates
    Q = q.shape[0]
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ c.float().T  # (Q, N)
    graded = batch.owner[None, :] == torch.arange(Q, device=q.device)[:, None]  # (Q, N)
    grades = batch.grade[None, :].expand(Q, -1)  # (Q, N)
    l_align = roar_loss(scores, grades, graded, tau=cfg.loss.tau_align, gamma=cfg.loss.gamma,
                        present=graded if cfg.loss.align_softmax == "graded" else None,
                        pairing=cfg.loss.pairing)
    metrics = {"align_loss": l_align.item()}
    rows = torch.nonzero(batch.top >= 0).squeeze(1)  # queries with a positive top group
    if rows.numel():
        out = masked_l1(batch, cfg, rows, graded[rows] if cfg.loss.exempt_labelled else None)
        l1 = out.loss
        metrics |= {"contrastive_loss": l1.item(), "masked_fraction": out.masked_fraction.item(),
                    "margin_masked_fraction": out.margin_masked_fraction.item(),
                    "in_batch_accuracy": out.accuracy.item()}
    else:
        l1 = scores.sum() * 0.0
    loss = roar_objective(l1, l_align, beta=cfg.loss.beta)
    if cfg.loss.distill_weight > 0:  # + λ · L_KD over each query's scored list
        in_list = ((batch.list_owner[None, :] == torch.arange(Q, device=q.device)[:, None])
                   & ~torch.isnan(batch.teacher)[None, :])  # (Q, N)
        l_kd = listwise_distillation_loss(scores, batch.teacher[None, :].expand(Q, -1),
                                          in_list, tau_student=cfg.loss.distill_tau,
                                          tau_teacher=cfg.loss.teacher_tau)
        metrics["distill_loss"] = l_kd.item()
        loss = loss + cfg.loss.distill_weight * l_kd
    return loss, metrics


OBJECTIVES: dict[str, Callable[[Any, TrainConfig], Objective]] = {
    "contrastive": stage1_objective, "roar": stage2_objective}
