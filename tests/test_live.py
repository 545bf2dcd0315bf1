"""Live segments against brute force: a shard with tombstones, patches and a delta segment
answers as an exact index built from the final catalog; new BM25 documents score as the base
would score them; the change log appends, polls, replays and refuses a second writer."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.index.changelog import (
    Change,
    ChangeLog,
    ChangeLogError,
    encode_vector,
)
from retrieval_platform.index.faiss_ops import IndexParams, brute_force_topk
from retrieval_platform.index.live import LiveLexical, LiveShard, home_shard
from retrieval_platform.index.store import CatalogFilter, LoadedShard
from retrieval_platform.serving.search import merge_hits, shard_hits_many

KEY = "m:8"


def _unit(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _base_shards(xb, ids, prices, bounds):
    shards = []
    for s, (a, b) in enumerate(bounds):
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb[a:b])
        meta = pa.table({"row": pa.array(range(a, b), pa.int64()), "product_id": ids[a:b],
                         "title": [f"t{p}" for p in ids[a:b]], "category": ["A"] * (b - a),
                         "price": prices[a:b]})
        shards.append(LoadedShard(s, index, meta, IndexParams(), "v", "m"))
    return shards


def test_live_shards_answer_as_an_exact_index_of_the_final_catalog():
    rng = np.random.default_rng(0)
    n, bounds = 120, [(0, 60), (60, 120)]
    xb = _unit(rng, n)
    ids = [f"p{i}" for i in range(n)]
    prices = [float(i) for i in range(n)]
    live = [LiveShard(b, 2, KEY, 0) for b in _base_shards(xb, ids, prices, bounds)]
    final = {p: {"vec": xb[i], "price": prices[i], "in_stock": None} for i, p in enumerate(ids)}
    changes, new = [], 0
    for seq in range(1, 401):
        r = rng.random()
        present = sorted(final)
        if r < 0.35:  # a new product
            pid, new = f"n{new}", new + 1
        elif r < 0.55:  # an existing one re-embedded
            pid = present[rng.integers(len(present))]
        else:
            pid = present[rng.integers(len(present))]
            if r < 0.8:
                price, stock = float(rng.integers(0, 200)), bool(rng.random() < 0.7)
                final[pid] |= {"price": price, "in_stock": stock}
                changes.append(Change(seq, "patch", pid, {"price": price, "in_stock": stock}))
            else:
                del final[pid]
                changes.append(Change(seq, "delete", pid))
            continue
        vec, price = _unit(rng, 1)[0], float(rng.integers(0, 200))
        final[pid] = {"vec": vec, "price": price, "in_stock": None}
        changes.append(Change(seq, "upsert", pid, {"product_id": pid, "title": pid,
                                                   "category": "A", "price": price},
                              {KEY: encode_vector(vec)}))
    for shard in live:
        shard.apply(changes[:200])
        shard.apply(changes)  # a replay of the first half changes nothing
        assert shard.position == 400
    assert sum(s.delta.count for s in live) > 0 and all(s.meta.dead.any() for s in live)

    names = sorted(final)
    xf = np.stack([final[p]["vec"] for p in names])
    xq = _unit(rng, 6)
    for filters, keep in [
        (None, lambda f: True),
        (CatalogFilter(price_max=80.0), lambda f: f["price"] <= 80.0),
        (CatalogFilter(in_stock=False), lambda f: f["in_stock"] is False),
    ]:
        sub = [p for p in names if keep(final[p])]
        xs = np.stack([final[p]["vec"] for p in sub])
        _, expected = brute_force_topk(xq, xs, 10)
        per_shard = [shard_hits_many(s, xq, 10, [filters] * len(xq)) for s in live]
        for j in range(len(xq)):
            got = merge_hits([hits[j] for hits in per_shard], 10)
            assert [h["product_id"] for h in got] == [sub[i] for i in expected[j] if i >= 0]
            for h in got:
                assert h["price"] == final[h["product_id"]]["price"]
    assert len(names) == len(xf)


def test_an_upsert_lands_in_its_home_shard_only():
    rng = np.random.default_rng(1)
    xb = _unit(rng, 20)
    ids = [f"p{i}" for i in range(20)]
    live = [LiveShard(b, 2, KEY, 0) for b in _base_shards(xb, ids, [1.0] * 20,
                                                          [(0, 10), (10, 20)])]
    moved = next(p for p in ids[:10] if home_shard(p, 2) == 1)  # in shard 0, home shard 1
    change = Change(1, "upsert", moved, {"product_id": moved, "title": "x"},
                    {KEY: encode_vector(xb[0])})
    for shard in live:
        shard.apply([change])
    assert live[0].meta.live(moved) is None and moved not in live[0].delta.pos
    assert moved in live[1].delta.pos


def test_a_new_bm25_document_scores_as_the_base_would_score_it():
    texts = ["red running shoes", "stainless steel kettle", "red kettle with whistle",
             "cordless drill 18V battery", "blue running shorts"]
    ids = [f"p{i}" for i in range(len(texts))]
    bm25 = BM25Retriever(ids, texts)
    meta = pa.table({"product_id": ids, "title": texts, "category": ["A"] * 5,
                     "price": [1.0] * 5})
    before = dict(bm25.search(["red kettle"], 5)[0])
    live = LiveLexical(bm25, meta, bm25.avg_doc_len, 0)
    # p2 re-sent as it is: its delta entry scores what its base entry scored
    live.apply([Change(1, "upsert", "p2", {"product_id": "p2", "title": texts[2],
                                           "text": texts[2]}),
                Change(2, "delete", "p1"),
                Change(3, "upsert", "n0", {"product_id": "n0", "title": "zorbatron kettle",
                                           "text": "zorbatron kettle"})])
    hits = {h["product_id"]: h["score"] for h in live.search("red kettle", 5, None)}
    assert hits["p2"] == pytest.approx(before["p2"], rel=1e-5)
    assert "p1" not in hits and "n0" in hits
    assert live.search("zorbatron", 5, None)[0]["product_id"] == "n0"  # a term new to the base
    assert [h["product_id"] for h in live.search("stainless", 5, None)] == []


def test_the_change_log_appends_polls_replays_and_refuses_a_second_writer(tmp_path):
    log = ChangeLog(str(tmp_path / "_changes"))
    assert log.last_seq() == 0 and log.poll(1) == []
    log.append([Change(1, "delete", "a"), Change(2, "delete", "b")])
    log.append([Change(3, "patch", "c", {"price": 2.0})])
    assert log.last_seq() == 3
    assert [c.seq for c in log.poll(1)] == [1, 2] and log.poll(2) == []
    assert [c.seq for c in log.read_after(1)] == [2, 3]
    assert [c.seq for c in log.read_after(3)] == []
    with pytest.raises(ChangeLogError, match="another writer"):
        log.append([Change(3, "delete", "d")])
    with pytest.raises(ChangeLogError, match="consecutive"):
        log.append([Change(4, "delete", "d"), Change(6, "delete", "e")])
    log.append([Change(5, "delete", "e")])  # 4 never written: a gap
    with pytest.raises(ChangeLogError, match="missing"):
        list(log.read_after(0))


def test_a_product_id_with_unicode_line_separators_stays_one_change(tmp_path):
    """JSON leaves U+0085 / U+2028 / U+2029 / U+001C unescaped inside strings, and
    ``str.splitlines`` splits on them: the log must split on newlines only (a fuzzed id once
    cut a segment in two and stopped every follower)."""
    ids = ["a\x85b", "c\u2028d", "e\u2029f", "g\x1ch", "i\x0bj"]
    log = ChangeLog(str(tmp_path / "_changes"))
    log.append([Change(n, "patch", pid, {"price": 1.0}) for n, pid in enumerate(ids, 1)])
    assert [c.product_id for c in log.read_after(0)] == ids
    (tmp_path / "_changes" / "000000000006.jsonl").write_text('{"seq": 6, "op": "del')
    with pytest.raises(ChangeLogError, match="corrupted"):
        list(log.read_after(0))
