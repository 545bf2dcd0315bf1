"""Query augmentation (training/augment.py): typos by rule, never a catalog word; unit variants
only in the catalog's own forms; stage-1 pairs of the variants keep their query's positives."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_platform.training.augment import (
    NEIGHBOURS,
    AugmentConfig,
    augment_queries,
    typo,
    typo_variants,
    unit_variants,
    vocabulary,
)


class _Fixed:
    """A generator that returns the given integers, to hand-work a typo."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def integers(self, *_args, **_kwargs) -> int:
        return self.values.pop(0)


def test_each_kind_of_typo_by_hand():
    assert typo("drill", "drop", _Fixed(2)) == "drll"
    assert typo("drill", "double", _Fixed(1)) == "drrill"
    assert typo("drill", "swap", _Fixed(2)) == "dirll"
    assert typo("drill", "neighbour", _Fixed(1, 0)) == "ddill"  # r's first neighbour: d
    assert set(NEIGHBOURS["r"]) == set("edfgt") and "q" not in NEIGHBOURS["p"]


def test_typos_are_never_a_catalog_word_and_leave_numbers_and_short_words():
    vocab = vocabulary(["Garden hoe and hose", "18v cordless drill"])
    assert {"hoe", "hose", "18v", "cordless"} <= vocab.words and vocab.unit_forms == {"v"}
    rng = np.random.default_rng(0)
    for _ in range(200):
        for v in typo_variants("hose 18v kit", 2, vocab, rng):
            wrong = v.split(" ")[0]
            assert v.endswith(" 18v kit") and wrong != "hose" and wrong not in vocab.words
    assert typo_variants("18v kit", 3, vocab, rng) == []  # nothing of four letters


def test_unit_variants_join_split_and_use_only_the_catalogs_forms():
    rng = np.random.default_rng(0)
    vocab = vocabulary(["LED bulb 100 watt", "60w bulb"])  # the catalog writes watt and w
    got = set(unit_variants("led bulb 100watts", 10, vocab, rng))
    assert got == {"led bulb 100 watts", "led bulb 100watt", "led bulb 100 watt",
                   "led bulb 100w", "led bulb 100 w"}
    assert set(unit_variants("bulb 100 w", 10, vocabulary(["a 100-watt bulb"]), rng)) == {
        "bulb 100w"}  # "100-watt" is not a number-unit form: only w itself, joined
    assert unit_variants("2 in 1 ladder", 3, vocab, rng) == []  # "in" is not read as inches
    assert unit_variants("cordless drill", 3, vocab, rng) == []


def test_augment_queries_is_seeded_and_follows_the_fraction():
    queries = {f"q{i}": f"cordless drill number {i} 20 volt" for i in range(200)}
    vocab = vocabulary(["20v drill", "cordless drill"])
    cfg = AugmentConfig(typos_per_query=1, unit_variants=1, query_fraction=0.5, seed=3)
    a, b = augment_queries(queries, vocab, cfg), augment_queries(queries, vocab, cfg)
    assert a == b and 70 < len(a) < 130
    assert all(len(v) == 2 and v[0] != queries[q] for q, v in a.items())
    with pytest.raises(ValueError, match="query_fraction"):
        AugmentConfig(query_fraction=0)


def test_stage1_pairs_of_the_variants_keep_their_querys_positives(ray_local, tmp_path):
    from retrieval_platform.catalog.dataset import PreparedDataset
    from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
    from retrieval_platform.config import from_dict
    from retrieval_platform.training.examples import contrastive_examples

    out = tmp_path / "syn"
    prepare_catalog(from_dict(PrepareConfig, {"source": {"num_products": 300, "seed": 2},
                                              "output_dir": str(out)}))
    ds = PreparedDataset(out)
    plain = contrastive_examples(ds).to_pylist()
    augmented = contrastive_examples(ds, augment=AugmentConfig(typos_per_query=2)).to_pylist()
    originals = {(r["query_id"], r["pos_key"]): r for r in plain}
    extra = [r for r in augmented if "#aug" in r["query_id"]]
    assert len(augmented) == len(plain) + len(extra) and len(extra) >= len(plain)
    for r in extra:
        source = originals[(r["query_id"].split("#aug")[0], r["pos_key"])]
        assert r["query_text"] != source["query_text"]
        assert r["query_pos_keys"] == source["query_pos_keys"]
        assert r["neg_pool_keys"] == source["neg_pool_keys"]
