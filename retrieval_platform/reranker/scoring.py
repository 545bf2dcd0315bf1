"""Reranking with the cross-encoder, one definition for evaluation and serving: score a
query's candidates, then order the top N by that score (ties keep the first stage's order);
what lies below N keeps its first-stage order after them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from retrieval_platform import storage
from retrieval_platform.encoder.model import Precision
from retrieval_platform.reranker.model import CrossEncoder, reranker_info


def rerank_order(scores: Sequence[float] | np.ndarray) -> list[int]:
    """Indices of candidates by descending reranker score; equal scores keep their order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").tolist()


def score_candidates(model: CrossEncoder, query_texts: Mapping[str, str],
                     candidates: Mapping[str, Sequence[str]], product_text: Mapping[str, str],
                     batch_size: int = 64, precision: Precision = "fp32"
                     ) -> dict[str, dict[str, float]]:
    """query id -> product id -> reranker score, for every (query, candidate) pair once (the
    pairs of all queries scored together, in chunks of similar length)."""
    pairs = [(q, p) for q, cands in candidates.items() for p in dict.fromkeys(cands)]
    scores = model.score([query_texts[q] for q, _ in pairs], [product_text[p] for _, p in pairs],
                         batch_size, precision)
    out: dict[str, dict[str, float]] = {q: {} for q in candidates}
    for (q, p), s in zip(pairs, scores.tolist(), strict=True):
        out[q][p] = s
    return out


def load_reranker_folder(location: str | Path) -> tuple[CrossEncoder, str]:
    """The reranker at a folder or storage URI (this node's verified copy), and its id."""
    folder = storage.fetch(location)
    return CrossEncoder.from_pretrained(folder), reranker_info(folder)["model_id"]
