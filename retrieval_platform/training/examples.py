"""Training examples from a prepared dataset (and optionally mined hard negatives).

Stage 1 (contrastive): one row per (query, positive) pair, positive = grade at or above the
dataset's positive threshold (substitute-or-better), with a pool of hard negatives that the loop
samples from every epoch, and the keys the mask needs (METHOD.md Eq. 2): the variant group of
every candidate and the query's labelled positives.

Stage 2 (ROAR): one row per query with its graded candidates (variable count and number of
grade groups), the index of its top-grade product (Eq. 7's L₁ positive), and optionally mined
products that join the batch's candidates without a grade (unless the scale says unlabelled
means irrelevant: then they are the lowest group).

Products are referred to by 64-bit keys (hashes of ids and group ids), so that candidate sets
can be all-gathered across workers as tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TypedDict

import numpy as np
import pyarrow as pa

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.errors import PlatformError
from retrieval_platform.metrics import grade_bin
from retrieval_platform.training.augment import AugmentConfig, augment_queries, vocabulary
from retrieval_platform.training.mining import read_negatives


class PairBatch(TypedDict):
    """Stage 1's rows, as columns (what :func:`contrastive_examples` writes and a batch of them
    holds): one (query, positive) pair a row, with the keys Eq. 2's masks need."""

    query_id: list[str]
    query_text: list[str]
    pos_text: list[str]
    pos_key: list[int]  # the positive's product key (key64)
    pos_group_key: list[int]  # its variant group's key
    query_pos_keys: list[list[int]]  # every labelled positive of the query (label rule)
    neg_pool_texts: list[list[str]]  # the pool hard negatives are drawn from each epoch
    neg_pool_keys: list[list[int]]
    neg_pool_group_keys: list[list[int]]


class SampledPairBatch(PairBatch):
    """A stage-1 batch with this step's hard negatives drawn (:func:`sample_negatives`)."""

    neg_texts: list[list[str]]
    neg_keys: list[list[int]]
    neg_group_keys: list[list[int]]


class GroupBatch(TypedDict):
    """Stage 2's rows, as columns (:func:`roar_examples`): one query a row with its graded
    candidates (best group first) and mined, ungraded extras."""

    query_id: list[str]
    query_text: list[str]
    cand_texts: list[list[str]]
    cand_grades: list[list[float]]  # the group grade of each candidate (Eq. 4's groups)
    cand_keys: list[list[int]]
    cand_group_keys: list[list[int]]
    query_pos_keys: list[list[int]]
    extra_texts: list[list[str]]  # in the query's softmax row and L₁'s denominator only
    extra_keys: list[list[int]]
    extra_group_keys: list[list[int]]
    top_index: list[int]  # Eq. 7's L₁ positive among cand_*: 0, or −1 where none is positive
    # a teacher's score of each candidate and extra (NaN: not scored), with teacher scores
    cand_teacher: list[list[float]]
    extra_teacher: list[list[float]]


def key64(value: str) -> int:
    """A stable signed 64-bit key for an id (torch has no uint64 arithmetic)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big",
                          signed=True)


class _Catalog:
    """Product text and group lookups, plus a seeded sampler of random products."""

    def __init__(self, ds: PreparedDataset, seed: int) -> None:
        products = ds.products(["product_id", "text", "variant_group"])
        self.ids: list[str] = products["product_id"].to_pylist()
        self.text = dict(zip(self.ids, products["text"].to_pylist(), strict=True))
        self.group = dict(zip(self.ids, products["variant_group"].to_pylist(), strict=True))
        self.rng = np.random.default_rng(seed)

    def random(self, n: int) -> list[str]:
        return [self.ids[i] for i in self.rng.integers(len(self.ids), size=n)]


def contrastive_examples(
    ds: PreparedDataset,
    *,
    split: str = "train",
    hard_negatives: int = 0,
    negatives_path: str | None = None,
    max_pairs_per_query: int | None = None,
    positive_threshold: float | None = None,
    augment: AugmentConfig | None = None,
    seed: int = 0,
) -> pa.Table:
    """Stage-1 pairs, shuffled with ``seed``: one row per (query, positive), positive = a judged
    product at or above ``positive_threshold`` (default: the scale's substitute-or-better).

    Each row carries a *pool* of negatives (``neg_pool_*``) from which the training loop samples
    ``hard_negatives`` afresh every epoch: the query's mined negatives minus every judged product
    above the scale's lowest grade and every variant of a positive (the miner's rules, applied
    again here in case the file came from elsewhere); where the pool is short of
    ``hard_negatives``, random catalog products fill it. With ``hard_negatives: 0`` the pool is
    empty and the batch's other positives are the only negatives (plain in-batch InfoNCE).

    ``augment`` adds, for each pair, the same pair with each of its query's variants
    (:mod:`retrieval_platform.training.augment`: typos, spacing and unit forms); a variant's
    ``query_id`` is its query's with ``#aug<n>``."""
    cat = _Catalog(ds, seed)
    scale = ds.scale
    threshold = scale.positive_threshold if positive_threshold is None else positive_threshold
    qtext = ds.query_texts(split)
    judged = ds.qrels(split)
    positives = ds.positives(split, threshold)
    mined = read_negatives(negatives_path) if hard_negatives else {}
    variants = augment_queries({q: qtext[q] for q in positives}, vocabulary(cat.text.values()),
                               augment) if augment else {}

    rows: dict[str, list] = defaultdict(list)
    for qid in sorted(positives):
        pos = positives[qid]
        if max_pairs_per_query and len(pos) > max_pairs_per_query:
            pos = [pos[i] for i in sorted(cat.rng.choice(len(pos), max_pairs_per_query,
                                                         replace=False))]
        not_negative = {p for p, g in judged[qid].items() if g > scale.min_grade}
        pos_groups = {cat.group[p] for p in positives[qid]}
        pool = [n for n in mined.get(qid, [])
                if n not in not_negative and cat.group.get(n) not in pos_groups]
        while len(pool) < hard_negatives:  # random products fill a short pool
            pool += [n for n in cat.random(hard_negatives - len(pool))
                     if n not in not_negative and cat.group[n] not in pos_groups]
        asked = [(qid, qtext[qid])] + [(f"{qid}#aug{n}", v)
                                       for n, v in enumerate(variants.get(qid, []), 1)]
        for (query_id, text), p in ((a, p) for a in asked for p in pos):
            rows["query_id"].append(query_id)
            rows["query_text"].append(text)
            rows["pos_text"].append(cat.text[p])
            rows["pos_key"].append(key64(p))
            rows["pos_group_key"].append(key64(cat.group[p]))
            rows["query_pos_keys"].append([key64(x) for x in positives[qid]])
            rows["neg_pool_texts"].append([cat.text[n] for n in pool])
            rows["neg_pool_keys"].append([key64(n) for n in pool])
            rows["neg_pool_group_keys"].append([key64(cat.group[n]) for n in pool])
    if not rows:
        raise PlatformError(f"{ds.location}: no {split} query has a positive (grade >= "
                            f"{threshold}); nothing to train stage 1 on")
    table = pa.table(rows)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def sample_negatives(batch: PairBatch, hard_negatives: int,
                     rng: np.random.Generator) -> SampledPairBatch:
    """``hard_negatives`` of each row's pool, drawn without replacement (a fresh draw each
    epoch, since the caller seeds ``rng`` by epoch and step): adds ``neg_texts``, ``neg_keys``
    and ``neg_group_keys``."""
    texts, keys, groups = [], [], []
    for pool_t, pool_k, pool_g in zip(batch["neg_pool_texts"], batch["neg_pool_keys"],
                                      batch["neg_pool_group_keys"], strict=True):
        pick = rng.choice(len(pool_t), size=min(hard_negatives, len(pool_t)), replace=False)
        texts.append([pool_t[i] for i in pick])
        keys.append([pool_k[i] for i in pick])
        groups.append([pool_g[i] for i in pick])
    return SampledPairBatch(**batch, neg_texts=texts, neg_keys=keys, neg_group_keys=groups)


def roar_examples(
    ds: PreparedDataset,
    *,
    split: str = "train",
    max_candidates: int = 16,
    negatives_path: str | None = None,
    mined_per_query: int = 0,
    grade_bins: Sequence[float] | None = None,
    teacher_scores: Mapping[str, Mapping[str, float]] | None = None,
    seed: int = 0,
) -> pa.Table:
    """Stage-2 groups: per query its judged products (at most ``max_candidates``, sampled so
    that every grade present keeps at least one product), and, only where the grade scale says
    unlabelled means irrelevant, mined negatives at the lowest grade. Queries with fewer than two
    grade groups are skipped: ROAR has nothing to order there.

    ``grade_bins`` (ascending edges) groups noisy mean ratings: a grade's group is the number of
    edges at or below it (edges [1.8, 2.5] on Home Depot's 1–3: ≤ 1.67 / 2–2.33 / ≥ 2.67), so
    ROAR orders only groups a whole bin apart. Positives (Eq. 7's L₁) still use the raw grade.

    ``teacher_scores`` (:func:`~retrieval_platform.training.teacher.read_teacher_scores`) adds
    each candidate's teacher score (``cand_teacher``, ``extra_teacher``; NaN where the teacher
    did not score it), and the unjudged products of the query's scored list become its extras
    (after the mined ones, up to ``mined_per_query``): the products distillation reaches that
    the judgments do not."""
    cat = _Catalog(ds, seed)
    scale = ds.scale
    qtext = ds.query_texts(split)
    judged = {q: list(j.items()) for q, j in ds.qrels(split).items()}
    mined = read_negatives(negatives_path) if mined_per_query else {}
    teacher = teacher_scores or {}

    def group_grade(g: float) -> float:
        return float(grade_bin(g, grade_bins)) if grade_bins else g

    rows: dict[str, list] = defaultdict(list)
    for qid in sorted(judged):
        raw = dict(judged[qid])
        pos_groups = {cat.group[p] for p, g in raw.items() if g >= scale.positive_threshold}
        extra = [n for n in dict.fromkeys([*mined.get(qid, []), *teacher.get(qid, {})])
                 if n not in raw and cat.group.get(n) not in pos_groups][:mined_per_query]
        if scale.unlabelled_is_irrelevant:  # mined products join the lowest grade group
            raw |= {n: scale.min_grade for n in extra}
            extra = []
        cands = [(p, group_grade(g)) for p, g in raw.items()]
        if len({g for _, g in cands}) < 2:
            continue
        if len(cands) > max_candidates:
            cands = sample_keeping_grades(cands, max_candidates, cat.rng)
        cands.sort(key=lambda pg: (-pg[1], -raw[pg[0]]))
        positives = [p for p, g in judged[qid] if g >= scale.positive_threshold]
        _add_group_row(rows, cat, qid, qtext[qid], cands, extra, positives,
                       top_is_positive=raw[cands[0][0]] >= scale.positive_threshold)
        if teacher_scores is not None:
            scored = teacher.get(qid, {})
            rows["cand_teacher"].append([scored.get(p, math.nan) for p, _ in cands])
            rows["extra_teacher"].append([scored.get(n, math.nan) for n in extra])
    if not rows:
        raise PlatformError(f"{ds.location}: no {split} query has two or more grade groups; "
                            "nothing for ROAR to order")
    table = pa.table(rows)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def _add_group_row(rows: dict[str, list], cat: _Catalog, qid: str, text: str,
                   cands: list[tuple[str, float]], extra: list[str], positives: list[str],
                   top_is_positive: bool) -> None:
    """One :class:`GroupBatch` row: the query's graded candidates (best group first), its
    mined extras, its labelled positives and its L₁ positive."""
    rows["query_id"].append(qid)
    rows["query_text"].append(text)
    rows["cand_texts"].append([cat.text[p] for p, _ in cands])
    rows["cand_grades"].append([float(g) for _, g in cands])
    rows["cand_keys"].append([key64(p) for p, _ in cands])
    rows["cand_group_keys"].append([key64(cat.group[p]) for p, _ in cands])
    rows["query_pos_keys"].append([key64(p) for p in positives])
    # Mined, unjudged products: in the query's softmax row and L₁'s denominator, in no group.
    rows["extra_texts"].append([cat.text[n] for n in extra])
    rows["extra_keys"].append([key64(n) for n in extra])
    rows["extra_group_keys"].append([key64(cat.group[n]) for n in extra])
    # Eq. 7's λ·L₁ pair: the first top-group product, when it is a positive at all.
    rows["top_index"].append(0 if top_is_positive else -1)


def sample_keeping_grades(cands: list[tuple[str, float]], n: int,
                           rng: np.random.Generator) -> list[tuple[str, float]]:
    by_grade: dict[float, list[tuple[str, float]]] = defaultdict(list)
    for c in cands:
        by_grade[c[1]].append(c)
    keep = [group[int(rng.integers(len(group)))] for group in by_grade.values()]
    rest = [c for c in cands if c not in keep]
    extra = rng.choice(len(rest), size=max(0, n - len(keep)), replace=False)
    return keep + [rest[i] for i in sorted(extra)]
