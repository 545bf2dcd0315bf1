"""Training examples from a prepared dataset (and optionally mined hard negatives).

Stage 1 (contrastive): one row per (query, positive) pair, positive = grade at or above the
dataset's positive threshold (substitute-or-better), with H hard negatives, and the keys the
mask needs (METHOD.md Eq. 2): the variant group of every candidate and the query's labelled
positives.

Stage 2 (ROAR): one row per query with its graded candidates (variable count and number of
grade groups; padded and masked in the batch), plus one top-group pair for Eq. 7's λ·L₁ term.

Products are referred to by 64-bit keys (hashes of ids and group ids), so that candidate sets
can be all-gathered across workers as tensors.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.errors import PlatformError

NEGATIVES_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("negative_ids", pa.list_(pa.string()), nullable=False),  # best-scoring first
    pa.field("negative_scores", pa.list_(pa.float32()), nullable=False),
])


def key64(value: str) -> int:
    """A stable signed 64-bit key for an id (torch has no uint64 arithmetic)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big",
                          signed=True)


def read_negatives(path: str | Path | None) -> dict[str, list[str]]:
    if not path:
        return {}
    path = Path(path)
    if not path.exists():
        raise PlatformError(f"{path}: no hard negatives here (run data_jobs.mine_negatives)")
    table = pq.read_table(path, columns=["query_id", "negative_ids"])
    return dict(zip(table["query_id"].to_pylist(), table["negative_ids"].to_pylist(),
                    strict=True))


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
    seed: int = 0,
) -> pa.Table:
    """Stage-1 pairs, shuffled with ``seed``. Queries with fewer mined negatives than asked get
    random catalog products instead, so that every row has exactly ``hard_negatives``."""
    cat = _Catalog(ds, seed)
    scale = ds.scale
    queries = ds.queries(split, ["query_id", "text"])
    qtext = dict(zip(queries["query_id"].to_pylist(), queries["text"].to_pylist(), strict=True))
    judgments = ds.judgments(split, ["query_id", "product_id", "grade"])
    positives: dict[str, list[str]] = defaultdict(list)
    for q, p, g in zip(*(judgments[c].to_pylist() for c in ("query_id", "product_id", "grade")),
                       strict=True):
        if g >= scale.positive_threshold:
            positives[q].append(p)
    mined = read_negatives(negatives_path)

    rows: dict[str, list] = defaultdict(list)
    for qid in sorted(positives):
        pos = positives[qid]
        if max_pairs_per_query and len(pos) > max_pairs_per_query:
            pos = [pos[i] for i in sorted(cat.rng.choice(len(pos), max_pairs_per_query,
                                                         replace=False))]
        pos_groups = {cat.group[p] for p in positives[qid]}
        for p in pos:
            negs = [n for n in mined.get(qid, []) if n not in positives[qid]][:hard_negatives]
            while len(negs) < hard_negatives:  # random negatives fill the gap
                negs += [n for n in cat.random(hard_negatives - len(negs))
                         if n not in positives[qid] and cat.group[n] not in pos_groups]
            rows["query_id"].append(qid)
            rows["query_text"].append(qtext[qid])
            rows["pos_text"].append(cat.text[p])
            rows["pos_key"].append(key64(p))
            rows["pos_group_key"].append(key64(cat.group[p]))
            rows["query_pos_keys"].append([key64(x) for x in positives[qid]])
            rows["neg_texts"].append([cat.text[n] for n in negs])
            rows["neg_keys"].append([key64(n) for n in negs])
            rows["neg_group_keys"].append([key64(cat.group[n]) for n in negs])
    if not rows:
        raise PlatformError(f"{ds.path}: no {split} query has a positive (grade >= "
                            f"{scale.positive_threshold}); nothing to train stage 1 on")
    table = pa.table(rows)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def roar_examples(
    ds: PreparedDataset,
    *,
    split: str = "train",
    max_candidates: int = 16,
    negatives_path: str | None = None,
    mined_per_query: int = 0,
    seed: int = 0,
) -> pa.Table:
    """Stage-2 groups: per query its judged products (at most ``max_candidates``, sampled so
    that every grade present keeps at least one product), and, only where the grade scale says
    unlabelled means irrelevant, mined negatives at the lowest grade. Queries with fewer than two
    grade groups are skipped: ROAR has nothing to order there."""
    cat = _Catalog(ds, seed)
    scale = ds.scale
    queries = ds.queries(split, ["query_id", "text"])
    qtext = dict(zip(queries["query_id"].to_pylist(), queries["text"].to_pylist(), strict=True))
    judgments = ds.judgments(split, ["query_id", "product_id", "grade"])
    judged: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for q, p, g in zip(*(judgments[c].to_pylist() for c in ("query_id", "product_id", "grade")),
                       strict=True):
        judged[q].append((p, g))
    mined = read_negatives(negatives_path) if scale.unlabelled_is_irrelevant else {}

    rows: dict[str, list] = defaultdict(list)
    for qid in sorted(judged):
        cands = list(judged[qid])
        seen = {p for p, _ in cands}
        cands += [(n, scale.min_grade) for n in mined.get(qid, [])[:mined_per_query]
                  if n not in seen]
        if len({g for _, g in cands}) < 2:
            continue
        if len(cands) > max_candidates:
            cands = _sample_keeping_grades(cands, max_candidates, cat.rng)
        cands.sort(key=lambda pg: -pg[1])
        top_grade = cands[0][1]
        rows["query_id"].append(qid)
        rows["query_text"].append(qtext[qid])
        rows["cand_texts"].append([cat.text[p] for p, _ in cands])
        rows["cand_grades"].append([float(g) for _, g in cands])
        rows["cand_keys"].append([key64(p) for p, _ in cands])
        rows["cand_group_keys"].append([key64(cat.group[p]) for p, _ in cands])
        rows["query_pos_keys"].append([key64(p) for p, g in judged[qid]
                                       if g >= scale.positive_threshold])
        # Eq. 7's λ·L₁ pair: the first top-group product, when it is a positive at all.
        rows["top_index"].append(0 if top_grade >= scale.positive_threshold else -1)
    if not rows:
        raise PlatformError(f"{ds.path}: no {split} query has two or more grade groups; "
                            "nothing for ROAR to order")
    table = pa.table(rows)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def _sample_keeping_grades(cands: list[tuple[str, float]], n: int,
                           rng: np.random.Generator) -> list[tuple[str, float]]:
    by_grade: dict[float, list[tuple[str, float]]] = defaultdict(list)
    for c in cands:
        by_grade[c[1]].append(c)
    keep = [group[int(rng.integers(len(group)))] for group in by_grade.values()]
    rest = [c for c in cands if c not in keep]
    extra = rng.choice(len(rest), size=max(0, n - len(keep)), replace=False)
    return keep + [rest[i] for i in sorted(extra)]
