"""BM25 (bm25s) and the hybrid fusions (RRF, convex) that evaluation and serving share."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.retrievers.hybrid import Fusion, fuse, rrf_fuse

IDS = ["p1", "p2", "p3", "p4"]
TEXTS = ["Red running shoes for men", "Blue electric kettle, stainless steel",
         "Silicone phone case", "Running socks, pack of 3"]


def test_bm25_stems_ranks_and_skips_non_matches():
    bm25 = BM25Retriever(IDS, TEXTS)
    hits = bm25.search(["run shoe", "kettles", "zzz", "the and of"], k=3)
    assert hits[3] == [] and not bm25.all_scores("the and of").any()  # stopwords only
    assert hits[0][0][0] == "p1" and {p for p, _ in hits[0]} == {"p1", "p4"}
    assert [p for p, _ in hits[1]] == ["p2"]  # "kettles" stems to "kettl"
    assert hits[2] == []
    scores = bm25.score("running shoes", ["p4", "p1", "p3"])
    assert scores[1] > scores[0] > scores[2] == 0


def test_bm25_mask_and_persistence(tmp_path):
    bm25 = BM25Retriever(IDS, TEXTS)
    masked = bm25.search(["running"], k=4, mask=np.array([False, True, True, True]))
    assert [p for p, _ in masked[0]] == ["p4"]
    bm25.save(tmp_path / "bm25")
    loaded = BM25Retriever.load(tmp_path / "bm25")
    assert loaded.search(["running shoes"], 4) == bm25.search(["running shoes"], 4)


def test_rrf_by_hand():
    """a: 1/61 + 1/62; b: 1/62 + 1/61; c: 1/63; ties broken by id."""
    fused = rrf_fuse([["a", "b", "c"], ["b", "a"]], k=3)
    assert [p for p, _ in fused] == ["a", "b", "c"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[2][1] == pytest.approx(1 / 63)
    assert rrf_fuse([["a"], ["b"]], k=5, weights=[1.0, 2.0])[0][0] == "b"


def test_convex_fusion_by_hand():
    """Dense scores 0.9/0.7/0.5 normalise to 1/0.5/0; BM25 12/4 to 1/0. With α = 0.25:
    a: .25·1 + .75·0 = .25; b: .25·.5 + .75·1 = .875; c: .25·0 = 0 (absent from BM25)."""
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]
    lexical = [("b", 12.0), ("a", 4.0)]
    fused = fuse(dense, lexical, k=3, fusion=Fusion("convex", dense_weight=0.25))
    assert [p for p, _ in fused] == ["b", "a", "c"]
    assert [s for _, s in fused] == pytest.approx([0.875, 0.25, 0.0])
    # α = 1 is the dense ranking, α = 0 the lexical one (then the dense-only ids, all 0)
    assert [p for p, _ in fuse(dense, lexical, 3, Fusion("convex", 1.0))] == ["a", "b", "c"]
    assert [p for p, _ in fuse(dense, lexical, 2, Fusion("convex", 0.0))] == ["b", "a"]
    # one hit, or an empty side: no division by zero
    assert fuse([("a", 0.3)], [], 2, Fusion("convex", 0.5)) == [("a", 0.5)]
    # the default is RRF with k = 60
    assert fuse(dense, lexical, 3) == rrf_fuse([["a", "b", "c"], ["b", "a"]], 3)
    with pytest.raises(ValueError, match="dense_weight"):
        Fusion("convex", 1.5)
