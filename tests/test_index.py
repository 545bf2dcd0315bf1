"""FAISS functions against brute force; the index folder: build, load, refuse corruption."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.index.faiss_ops import (
    IndexParams,
    brute_force_topk,
    build_faiss_index,
    merge_topk,
    search_index,
    search_shards,
    shard_bounds,
)


def _data(n=3000, d=32, nq=20, seed=0):
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((nq, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return xb, xq


def test_shard_bounds_cover_every_row_once():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(2, 3) == [(0, 1), (1, 1), (1, 2)]
    with pytest.raises(ValueError):
        shard_bounds(10, 0)


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_sharded_exact_search_equals_flat_and_brute_force(num_shards):
    xb, xq = _data()
    k = 10
    D_ref, I_ref = brute_force_topk(xq, xb, k)
    params = IndexParams()
    shards = [(build_faiss_index(xb[a:b], params), a) for a, b in shard_bounds(len(xb), num_shards)]
    D, I = search_shards(shards, xq, k, params)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, atol=1e-5)
    _, I_flat = search_index(build_faiss_index(xb, params), xq, k, params)
    np.testing.assert_array_equal(I_flat, I_ref)


def test_merge_topk_handles_missing_results():
    D, I = merge_topk([np.array([[0.9, -np.inf]]), np.array([[0.95, 0.1]])],
                      [np.array([[4, -1]]), np.array([[7, 9]])], 3)
    np.testing.assert_array_equal(I, [[7, 4, 9]])
    np.testing.assert_allclose(D, [[0.95, 0.9, 0.1]])
    _, I = merge_topk([np.array([[0.5, -np.inf]])], [np.array([[1, -1]])], 2)
    np.testing.assert_array_equal(I, [[1, -1]])


@pytest.mark.parametrize(("kind", "extra", "min_recall"), [
    ("ivf_flat", {"nprobe": 40}, 0.9), ("hnsw", {"ef_search": 64}, 0.9),
    ("ivf_pq", {"nprobe": 40, "pq_m": 8}, 0.4),
])
def test_approximate_indexes_find_most_true_neighbours(kind, extra, min_recall):
    xb, xq = _data(n=4000)
    _, I_ref = brute_force_topk(xq, xb, 10)
    params = IndexParams(kind=kind, **extra)
    _, I = search_index(build_faiss_index(xb, params), xq, 10, params)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_ref, strict=True)])
    assert recall >= min_recall


def test_refined_ivf_pq_factory_reranks_its_candidates_exactly():
    """IVF-PQ alone ranks by compressed codes; with ",RFlat" the k · k_factor candidates are
    re-scored with the stored vectors: exact scores, and recall at least as high."""
    xb, xq = _data(n=12000)
    _, I_ref = brute_force_topk(xq, xb, 10)

    def recall(I):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_ref, strict=True)])
    pq = IndexParams(factory="IVF64,PQ8x8", nprobe=64)
    refined = IndexParams(factory="IVF64,PQ8x8,RFlat", nprobe=64, k_factor=8)
    _, I_pq = search_index(build_faiss_index(xb, pq), xq, 10, pq)
    D, I = search_index(build_faiss_index(xb, refined), xq, 10, refined)
    assert recall(I) >= max(recall(I_pq), 0.9)
    exact = np.take_along_axis(xq @ xb.T, I, axis=1)  # the refined scores are the exact ones
    np.testing.assert_allclose(D, exact, atol=1e-5)
    with pytest.raises(ValueError, match="FAISS cannot build"):
        build_faiss_index(xb, IndexParams(factory="IVF64,PQ7"))  # 7 does not divide 32


@pytest.mark.parametrize(("kind", "factory"), [
    ("flat", None), ("ivf_flat", None), ("hnsw", None), ("ivf_pq", None),
    ("flat", "HNSW16"), ("flat", "IVF32,PQ8x4fs,RFlat"), ("flat", "IVF32,PQ8")])
def test_filters_return_only_allowed_rows(kind, factory):
    xb, xq = _data(n=2000)
    params = IndexParams(kind=kind, pq_m=8, factory=factory)
    index = build_faiss_index(xb, params)
    allowed = np.zeros(len(xb), dtype=bool)
    allowed[[3, 50, 700, 1999]] = True  # selective: exact search on the subset
    _, I = search_index(index, xq, 10, params, allowed)
    assert set(I[I >= 0].tolist()) <= {3, 50, 700, 1999}
    if kind != "ivf_pq" and factory != "IVF32,PQ8":  # exact on the subset: brute force over it
        _, I_ref = brute_force_topk(xq, xb[allowed], 4)
        np.testing.assert_array_equal(I[:, :4], np.flatnonzero(allowed)[I_ref])
    half = np.arange(len(xb)) % 2 == 0  # broad filter: the index's own filtered search
    _, I = search_index(index, xq, 10, params, half)
    assert (I[I >= 0] % 2 == 0).all()


@pytest.fixture(scope="module")
def built_index(ray_local, tmp_path_factory):
    from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
    from retrieval_platform.config import from_dict
    from retrieval_platform.index.build import BuildIndexConfig, build_version

    root = tmp_path_factory.mktemp("idx")
    prepare_catalog(from_dict(PrepareConfig, {"source": {"num_products": 300},
                                              "output_dir": str(root / "data")}))
    manifest = build_version(from_dict(BuildIndexConfig, {
        "prepared_dir": str(root / "data"), "model": "tiny", "output_root": str(root / "indexes"),
        "version": "v1", "num_shards": 3,
        "embed": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 64}}))
    return root, manifest


def test_build_index_publishes_a_verifiable_version(built_index):
    from retrieval_platform.index.store import load_manifest, load_shard, resolve_index_dir
    from retrieval_platform.serving.search import LocalSearcher

    root, manifest = built_index
    assert resolve_index_dir(root / "indexes") == str(root / "indexes" / "v1")
    assert manifest.num_products == 300
    assert [s.count for s in manifest.shards] == [100, 100, 100]
    assert load_manifest(root / "indexes") == manifest  # what was written is what is read
    assert manifest.model.model_id.startswith("tiny-")
    assert (root / "indexes" / "v1" / "embeddings").is_dir()
    shard = load_shard(root / "indexes" / "v1", 2)
    assert shard.offset == 200 and shard.index.ntotal == 100
    searcher = LocalSearcher(root / "indexes" / "v1")
    hits = searcher.search("red running shoes", k=5)
    assert len(hits) == 5 and hits[0]["score"] >= hits[-1]["score"]
    assert {h["shard"] for h in hits} <= {0, 1, 2}
    lexical = searcher.search("running shoes", k=5, mode="lexical")
    assert all("running" in h["title"].lower() or "shoe" in h["title"].lower() for h in lexical)
    cat = searcher.search("shoes", k=20, filters={"category": "sports > footwear"})
    assert cat and all(h["category"].lower().startswith("sports > footwear") for h in cat)
    cheap = searcher.search("kettle", k=20, mode="hybrid", filters={"price_max": 20.0})
    assert all(h["price"] <= 20.0 for h in cheap)


def test_auto_shards_hold_the_vectors_on_as_few_shards_as_the_cores_allow():
    from retrieval_platform.index.build import auto_num_shards

    assert auto_num_shards(54_667, 2, exact=True) == 1
    assert auto_num_shards(1_200_000, 2, exact=True) == 2  # 3 wanted, 2 cores
    assert auto_num_shards(1_200_000, 16, exact=True) == 3
    assert auto_num_shards(1_200_000, 16, exact=False) == 1  # ANN: split for memory only
    assert auto_num_shards(0, 0, exact=True) == 1


def test_a_rebuild_from_stored_embeddings_serves_what_the_embedded_build_serves(built_index,
                                                                               tmp_path):
    """embeddings_from: a new shard count (auto: 1 here) from the stored vectors, no encoding;
    the answers equal the 3-shard version's; another model's vectors are refused."""
    from retrieval_platform.config import from_dict
    from retrieval_platform.index.build import BuildIndexConfig, build_version
    from retrieval_platform.index.store import IndexLoadError
    from retrieval_platform.serving.search import LocalSearcher

    root, _ = built_index
    config = {"prepared_dir": str(root / "data"), "model": "tiny",
              "output_root": str(tmp_path / "indexes"), "num_shards": "auto",
              "embeddings_from": str(root / "indexes" / "v1")}
    manifest = build_version(from_dict(BuildIndexConfig, config | {"version": "one"}))
    assert [s.count for s in manifest.shards] == [300]
    rebuilt, embedded = LocalSearcher(manifest.path), LocalSearcher(root / "indexes" / "v1")
    for query in ("red running shoes", "stainless steel kettle"):
        want = embedded.search(query, k=10)
        got = rebuilt.search(query, k=10)
        assert [h["product_id"] for h in got] == [h["product_id"] for h in want]
        assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-5)
    other = tmp_path / "other"
    shutil.copytree(root / "indexes" / "v1", other)
    data = json.loads((other / "manifest.json").read_text())
    data["model"]["model_id"] = "another-model"
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IndexLoadError, match="built with model another-model"):
        build_version(from_dict(BuildIndexConfig, config | {"version": "two",
                                                            "embeddings_from": str(other)}))


def test_hybrid_requests_use_the_index_versions_fusion(built_index):
    """The manifest records the fusion (RRF by default); hybrid answers are exactly
    ``retrievers.hybrid.fuse`` of the dense and lexical lists, convex fusion included."""
    from retrieval_platform.retrievers.hybrid import Fusion, fuse
    from retrieval_platform.serving.search import LocalSearcher

    root, manifest = built_index
    assert manifest.fusion == Fusion(method="rrf", dense_weight=0.5, rrf_k=60)
    searcher = LocalSearcher(root / "indexes" / "v1")
    assert searcher.manifest.fusion == Fusion()
    searcher.manifest.fusion = Fusion("convex", dense_weight=0.7)
    dense = searcher.search("red kettle", k=100)
    lexical = searcher.search("red kettle", k=100, mode="lexical")
    want = fuse([(h["product_id"], h["score"]) for h in dense],
                [(h["product_id"], h["score"]) for h in lexical], 10, searcher.manifest.fusion)
    got = searcher.search("red kettle", k=10, mode="hybrid")
    assert [h["product_id"] for h in got] == [p for p, _ in want]
    assert [h["score"] for h in got] == pytest.approx([s for _, s in want])


def test_a_matryoshka_index_serves_the_first_dims(built_index):
    """dim = 16 of the tiny model's 64: the index holds the renormalised prefixes, queries are
    encoded the same way, and the answer equals brute force over those prefixes."""
    from retrieval_platform.config import from_dict
    from retrieval_platform.encoder.model import DualEncoder
    from retrieval_platform.index.build import BuildIndexConfig, build_version
    from retrieval_platform.serving.search import LocalSearcher

    root, _ = built_index
    manifest = build_version(from_dict(BuildIndexConfig, {
        "prepared_dir": str(root / "data"), "model": "tiny", "output_root": str(root / "mrl"),
        "version": "v16", "num_shards": 2, "dim": 16, "bm25": False,
        "embed": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 64}}))
    assert manifest.dim == 16 and manifest.model.dim == 64 and manifest.served_dim == 16
    searcher = LocalSearcher(root / "mrl" / "v16")
    assert searcher.shards[0].base.index.d == 16
    hits = searcher.search("red running shoes", k=5)
    model = DualEncoder.from_pretrained(manifest.model.path)
    products = PreparedDataset(root / "data").products(["product_id", "text"])
    xb = model.encode(products["text"].to_pylist(), "product", dim=16)
    xq = model.encode(["red running shoes"], "query", dim=16)
    best = np.argsort(-(xb @ xq[0]))[:5]
    assert [h["product_id"] for h in hits] == [products["product_id"][int(i)].as_py()
                                               for i in best]


def test_corrupted_or_lying_index_is_refused(built_index, tmp_path):
    from retrieval_platform.index.store import IndexLoadError, load_shard

    root, _ = built_index
    bad = tmp_path / "bad"
    shutil.copytree(root / "indexes" / "v1", bad)
    faiss_file = bad / "shard_001.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:-100])  # truncated
    with pytest.raises(IndexLoadError, match=r"shard_001\.faiss: sha256 does not match"):
        load_shard(bad, 1)
    load_shard(bad, 0)  # the intact shards still load
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["dim"] = 128  # lies about the index's dimension
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError, match="dimension 64, manifest says 128"):
        load_shard(bad, 0)
    manifest["dim"] = 64
    manifest["shards"][0]["count"] = 99  # lies about the count
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError, match="manifest says 99"):
        load_shard(bad, 0)
    with pytest.raises(IndexLoadError, match="built with model"):
        load_shard(root / "indexes" / "v1", 0, expected_model_id="other-model")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(IndexLoadError, match="not valid JSON"):
        load_shard(bad, 0)


def test_the_hybrid_we_report_is_the_hybrid_we_serve(built_index):
    """Evaluation fuses the same HYBRID_DEPTH candidates of each side, with the same function,
    as a served hybrid request: given the served dense and lexical lists, evaluation's hybrid
    ranking is the served answer, for RRF and convex fusion."""
    from retrieval_platform.evaluation.run import EvaluateConfig, _hybrid, _Ranked
    from retrieval_platform.retrievers.hybrid import HYBRID_DEPTH, Fusion
    from retrieval_platform.serving.search import LocalSearcher, candidate_depth

    root, _ = built_index
    searcher = LocalSearcher(root / "indexes" / "v1")
    queries = ["red running shoes", "stainless steel kettle", "cordless drill 18v"]
    assert candidate_depth("hybrid", 10) == HYBRID_DEPTH == EvaluateConfig().depth
    for fusion in (Fusion(), Fusion("convex", dense_weight=0.7)):
        searcher.manifest.fusion = fusion
        depth = candidate_depth("hybrid", 10)
        parts = {mode: {q: [(h["product_id"], h["score"])
                            for h in searcher.search(q, k=depth, mode=mode)] for q in queries}
                 for mode in ("dense", "lexical")}
        reported = _hybrid(*(_Ranked(parts[m], {q: {} for q in queries},
                                     {q: {} for q in queries}, 0.0) for m in parts),
                           EvaluateConfig().depth, fusion)
        for q in queries:
            served = searcher.search(q, k=10, mode="hybrid")
            assert [h["product_id"] for h in served] == reported.rankings[q][:10]
            assert [h["score"] for h in served] == pytest.approx(
                [s for _, s in reported.hits[q][:10]])


def test_an_evaluation_cannot_fuse_fewer_candidates_than_the_service():
    from retrieval_platform.config import ConfigError, from_dict
    from retrieval_platform.evaluation.run import EvaluateConfig

    with pytest.raises(ConfigError, match="a hybrid fuses the top 100 of each side"):
        from_dict(EvaluateConfig, {"models": {"m": "tiny"}, "hybrid": ["m"], "depth": 50})
    assert from_dict(EvaluateConfig, {"depth": 50}).depth == 50  # no hybrid: any depth
