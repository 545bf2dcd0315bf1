"""Grade scales, text normalisation, variant groups, splits, the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_platform.catalog import schema
from retrieval_platform.catalog.prepare import variant_groups
from retrieval_platform.catalog.synthetic import TYPES, generate_catalog
from retrieval_platform.catalog.text import (
    normalize_text,
    query_id_from_text,
    render_product_text,
    title_key,
)
from retrieval_platform.catalog.validate import assign_split


def test_esci_scale_parses_labels_and_gains():
    assert schema.ESCI.parse("exact") == (3.0, "exact")
    assert schema.ESCI.parse("2") == (2.0, "Substitute")
    with pytest.raises(ValueError, match="unknown label 'X'"):
        schema.ESCI.parse("X")
    np.testing.assert_allclose(schema.ESCI.gain([3, 2, 1, 0]), [1.0, 0.1, 0.01, 0.0])
    assert "Exact 1" in schema.ESCI.describe_gains()


def test_numeric_scale_homedepot():
    assert schema.HOMEDEPOT.parse("2.33") == (2.33, None)
    with pytest.raises(ValueError, match="outside"):
        schema.HOMEDEPOT.parse("3.5")
    with pytest.raises(ValueError, match="not a number"):
        schema.HOMEDEPOT.parse("high")
    np.testing.assert_allclose(schema.HOMEDEPOT.gain([1, 2, 3]), [0.0, 0.5, 1.0])


def test_scale_roundtrips_through_dict():
    for scale in schema.GRADE_SCALES.values():
        assert schema.GradeScale.from_dict(scale.to_dict()) == scale


def test_text_normalisation():
    assert normalize_text("  Caf\u00e9&amp;<b>Bar</b>\x00 \n x ") == "Café& Bar x"
    assert normalize_text("\uff21") == "A"  # NFKC
    assert title_key("Apex 300, Blue!") == title_key("apex  300 blue")
    assert query_id_from_text("Deck Over") == query_id_from_text("deck  over")


def test_render_product_text_keeps_title_and_truncates():
    text = render_product_text("Kettle", brand="Acme", category="Home > Kitchen",
                               attributes={"colour": "red"}, description="x" * 1000,
                               max_chars=60)
    assert text.startswith("Kettle\nBrand: Acme\nCategory: Home > Kitchen\ncolour: red")
    assert len(text) <= 60
    assert render_product_text("T" * 100, max_chars=10) == "T" * 100


def test_variant_groups_union_family_and_title():
    # p1,p2 share a family; p3 shares p2's title; p4 alone; p5 has no family but p4's title.
    groups = variant_groups(
        ["p1", "p2", "p3", "p4", "p5", "p6"],
        ["F1", "F1", "F2", "F3", None, None],
        ["a", "b", "b", "c", "c", "d"],
    )
    assert groups[0] == groups[1] == groups[2] == "F1"
    assert groups[3] == groups[4] == "F3"
    assert groups[5] == "p:p6"


def test_split_is_deterministic_and_follows_fractions():
    fr = {"train": 0.8, "dev": 0.1, "test": 0.1}
    splits = [assign_split(f"q{i}", 0, fr) for i in range(5000)]
    assert splits == [assign_split(f"q{i}", 0, fr) for i in range(5000)]
    share = splits.count("train") / len(splits)
    assert 0.77 < share < 0.83
    assert splits != [assign_split(f"q{i}", 1, fr) for i in range(5000)]


def test_synthetic_catalog_is_deterministic_and_realistic():
    a = generate_catalog(1000, seed=3)
    b = generate_catalog(1000, seed=3)
    c = generate_catalog(1000, seed=4)
    assert a.products.equals(b.products) and a.judgments.equals(b.judgments)
    assert not a.queries.equals(c.queries)
    products = a.products.to_pandas()
    assert len(products) == 1000 and products.product_id.is_unique
    # Every type exists, families hold several variants, relisted titles repeat across families.
    assert products.category.nunique() == len(TYPES)
    assert products.groupby("variant_group").size().max() > 1
    titles = products.groupby("title").variant_group.nunique()
    assert (titles > 1).any()
    labels = set(a.judgments.column("label").to_pylist())
    assert labels == {"Exact", "Substitute", "Complement", "Irrelevant"}


def test_the_smallest_synthetic_catalog_generates():
    """At the minimum size not every type gets a family; queries still judge existing
    products (a department type without products used to crash the judging pool)."""
    for seed in range(3):
        cat = generate_catalog(len(TYPES), seed=seed)
        ids = set(cat.products["product_id"].to_pylist())
        assert cat.products.num_rows == len(TYPES)
        assert set(cat.judgments["product_id"].to_pylist()) <= ids
    with pytest.raises(ValueError, match="at least"):
        generate_catalog(len(TYPES) - 1)


def test_synthetic_labels_follow_the_rules():
    cat = generate_catalog(800, seed=0)
    products = cat.products.to_pandas().set_index("product_id")
    queries = dict(zip(cat.queries["query_id"].to_pylist(), cat.queries["text"].to_pylist(),
                       strict=True))
    judged = cat.judgments.to_pandas()
    for qid, rows in judged.groupby("query_id"):
        exact = rows[rows.label == "Exact"].product_id
        comp = rows[rows.label == "Complement"].product_id
        if len(exact) and len(comp):
            t_exact = {products.loc[p, "category"].split(" > ")[-1].lower() for p in exact}
            t_comp = {products.loc[p, "category"].split(" > ")[-1].lower() for p in comp}
            assert len(t_exact) == 1, queries[qid]  # one product type is exact
            assert not t_exact & t_comp


@pytest.mark.parametrize("bad", ["a\x00b", "a\x7fb", "a\x85b", "a\u2028b", "a\u2029b", "x" * 257])
def test_a_product_id_with_a_control_or_line_separator_is_rejected(bad):
    from retrieval_platform.catalog.validate import RowError, validate_product

    with pytest.raises(RowError, match="not a valid id"):
        validate_product({"product_id": bad, "title": "a kettle"})
    assert validate_product({"product_id": "sku-ü 42", "title": "a kettle"})["product_id"] \
        == "sku-ü 42"
