"""prepare_catalog on Ray Data: every supported format, bad input quarantined with reasons,
read = accepted + rejected, splits deterministic and disjoint."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_jobs import prepare_catalog as job
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
from retrieval_platform.catalog.sources import CatalogFormatError
from retrieval_platform.config import from_dict
from tests.catalog_files import write_esci, write_homedepot, write_wands


def _prepare(tmp_path, source, **extra):
    cfg = from_dict(PrepareConfig, {"source": source, "output_dir": str(tmp_path / "out"), **extra})
    return prepare_catalog(cfg), PreparedDataset(tmp_path / "out")


def _rejects(ds):
    return pq.read_table(ds.path / "rejects").to_pylist()


def _assert_counts_balance(manifest):
    for counts in manifest["counts"].values():
        assert counts["read"] == counts["accepted"] + counts["rejected"]
        assert sum(counts["reject_reasons"].values()) == counts["rejected"]


def test_homedepot_format_quarantines_bad_records(ray_local, tmp_path):
    expected = write_homedepot(tmp_path / "hd")
    manifest, ds = _prepare(tmp_path, {"format": "homedepot", "path": str(tmp_path / "hd")})
    _assert_counts_balance(manifest)
    c = manifest["counts"]
    assert c["products"]["read"] == expected["products_read"]
    assert c["products"]["accepted"] == expected["products_ok"]
    assert c["judgments"]["read"] == expected["judgments_read"]
    assert c["judgments"]["accepted"] == expected["judgments_ok"]
    reasons = {(r["table"], r["record"]): r["reason"] for r in _rejects(ds)}
    assert reasons[("products", 4)] == "title: missing or empty"
    assert reasons[("products", 5)].startswith("duplicate product_id (first at ")
    assert reasons[("products", 6)].startswith("title: invalid UTF-8")
    assert reasons[("products", 7)] == "malformed record: expected 2 fields, got 3"
    assert reasons[("judgments", 6)].startswith("grade: grade 'high' is not a number")
    assert reasons[("judgments", 7)].startswith("grade: grade 3.5 outside")
    assert reasons[("judgments", 8)].startswith("unknown product_id")
    assert reasons[("judgments", 9)] == "query_text: missing or empty"
    raw = {(r["table"], r["record"]): r["raw"] for r in _rejects(ds)}
    assert json.loads(raw[("products", 6)])["title"] == "Caf\\xe9 Table"  # raw bytes, escaped
    assert manifest["source"]["ignored_columns"] == {}
    products = ds.products().to_pylist()
    assert {p["product_id"] for p in products} == {"100001", "100002", "100006"}
    assert all(p["text"] == p["title"] for p in products)  # titles only in Home Depot
    queries = ds.queries().to_pylist()
    assert sorted(q["text"] for q in queries) == ["deck over", "l bracket", "microwave"]
    assert ds.scale.name == "homedepot"
    assert ds.qrels()  # grades are floats on the 1-3 range
    assert all(1 <= g <= 3 for rel in ds.qrels().values() for g in rel.values())


def test_esci_format_maps_columns_labels_and_locale(ray_local, tmp_path):
    write_esci(tmp_path / "esci")
    manifest, ds = _prepare(tmp_path, {"format": "esci", "path": str(tmp_path / "esci")})
    _assert_counts_balance(manifest)
    products = {p["product_id"]: p for p in ds.products().to_pylist()}
    assert set(products) == {"B01", "B02", "B03"}
    shoe = products["B01"]
    assert shoe["description"] == "Light & fast Mesh upper"
    assert dict(shoe["attributes"]) == {"colour": "Black"} and shoe["brand"] == "Nike"
    assert products["B02"]["title"] == "Phone Case Blue"
    judgments = {(j["query_id"], j["product_id"]): j for j in ds.judgments().to_pylist()}
    assert judgments[("10", "B01")]["grade"] == 3.0 and judgments[("10", "B01")]["label"] == "Exact"
    assert judgments[("11", "B01")]["grade"] == 1.0
    reasons = sorted(r["reason"] for r in _rejects(ds))
    assert "grade: unknown label 'X' (known: Exact, Substitute, Complement, Irrelevant)" in reasons
    assert sum("locale 'jp' not selected" in r for r in reasons) == 3  # product, query, example


def test_wands_format(ray_local, tmp_path):
    write_wands(tmp_path / "wands")
    manifest, ds = _prepare(tmp_path, {"format": "wands", "path": str(tmp_path / "wands")})
    _assert_counts_balance(manifest)
    products = {p["product_id"]: p for p in ds.products().to_pylist()}
    assert set(products) == {"0", "1"}
    assert products["0"]["category"] == "Furniture > Bedroom Furniture > Beds"
    assert dict(products["0"]["attributes"]) == {"color": "brown", "material": "wood",
                                                 "class": "Beds"}
    grades = {(j["query_id"], j["product_id"]): j["grade"] for j in ds.judgments().to_pylist()}
    assert grades == {("0", "0"): 2.0, ("0", "1"): 0.0, ("1", "1"): 1.0}
    reasons = sorted(r["reason"].split(" (")[0] for r in _rejects(ds))
    assert reasons == ["grade: unknown label 'Maybe'", "title: missing or empty",
                       "unknown product_id"]


def test_canonical_format_reports_extra_columns_and_wrong_types(ray_local, tmp_path):
    root = tmp_path / "canon"
    root.mkdir()
    pq.write_table(pa.table({
        "product_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"],
        "price": ["1.5", "abc", "-2", None],
        "attributes": ['{"colour": "red"}', None, None, "[1, 2]"],
        "warehouse": ["x", "y", "z", "w"],
    }), root / "products.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["a"]}), root / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1", "q1"], "product_id": ["a", "b"],
                             "grade": [3.0, 1.0]}), root / "judgments.parquet")
    manifest, ds = _prepare(tmp_path, {"format": "canonical", "path": str(root),
                                       "grade_scale": "esci"})
    _assert_counts_balance(manifest)
    assert manifest["source"]["ignored_columns"] == {str(root / "products.parquet"): ["warehouse"]}
    reasons = sorted(r["reason"] for r in _rejects(ds))
    assert reasons[:3] == ["attributes: expected a mapping, got list",
                           "price: must be a finite number >= 0 (got -2.0)",
                           "price: not a number ('abc')"]
    assert reasons[3].startswith("unknown product_id")
    assert ds.products().to_pylist()[0]["price"] == 1.5


def test_a_catalog_of_products_only_is_prepared_indexed_and_searched(ray_local, tmp_path):
    """Bring your own catalog without queries or judgments: index it with a pretrained model
    and search it (the serving code, in process)."""
    from retrieval_platform.index.build import BuildIndexConfig, build_version
    from retrieval_platform.serving.search import LocalSearcher

    root = tmp_path / "shop"
    root.mkdir()
    titles = ["Stainless steel electric kettle 1.7 L", "Cordless drill 18V with two batteries",
              "Queen size cotton bed sheets", "LED desk lamp with USB port"]
    pq.write_table(pa.table({"product_id": [f"p{i}" for i in range(4)], "title": titles}),
                   root / "products.parquet")
    manifest, ds = _prepare(tmp_path, {"format": "canonical", "path": str(root),
                                       "grade_scale": "esci"})
    assert ds.products().num_rows == 4 and ds.queries().num_rows == 0 == ds.judgments().num_rows
    _assert_counts_balance(manifest)
    built = build_version(from_dict(BuildIndexConfig, {
        "prepared_dir": str(ds.path), "model": "tiny", "output_root": str(tmp_path / "idx"),
        "num_shards": 2, "embed": {"actors": 1, "cpus_per_actor": 0.5}}))
    searcher = LocalSearcher(built.path)
    hits = searcher.search("electric kettle", k=4, mode="hybrid")
    assert sorted(h["product_id"] for h in hits) == ["p0", "p1", "p2", "p3"]
    assert searcher.search("kettle", k=1, mode="lexical")[0]["product_id"] == "p0"


def test_canonical_catalog_with_a_custom_grade_scale(ray_local, tmp_path):
    root = tmp_path / "stars"
    root.mkdir()
    pq.write_table(pa.table({"product_id": ["a", "b", "c"], "title": ["A", "B", "C"]}),
                   root / "products.parquet")
    pq.write_table(pa.table({"query_id": ["q1"], "text": ["a"]}), root / "queries.parquet")
    pq.write_table(pa.table({"query_id": ["q1"] * 3, "product_id": ["a", "b", "c"],
                             "grade": [2.0, 1.0, 5.0]}), root / "judgments.parquet")
    scale = {"name": "stars", "levels": [{"label": "great", "grade": 2.0, "gain": 1.0},
                                         {"label": "ok", "grade": 1.0, "gain": 0.3},
                                         {"label": "bad", "grade": 0.0, "gain": 0.0}],
             "positive_threshold": 1.0, "top_threshold": 2.0}
    _, ds = _prepare(tmp_path, {"format": "canonical", "path": str(root),
                                "grade_scale": scale})
    assert ds.scale.name == "stars" and ds.scale.describe_gains() == "stars: great 1, ok 0.3, bad 0"
    assert ds.qrels() == {"q1": {"a": 2.0, "b": 1.0}}  # grade 5 is no level: rejected, kept
    assert [r["reason"] for r in _rejects(ds)] == ["grade: grade 5.0 is not a level of stars"]
    with pytest.raises(ValueError, match="custom grade scale"):
        _prepare(tmp_path, {"format": "canonical", "path": str(root),
                            "grade_scale": {"name": "x", "colours": []}})


def test_missing_column_is_a_clear_error_naming_file_and_column(tmp_path):
    root = tmp_path / "hd"
    write_homedepot(root)
    (root / "products.csv").write_text("product_uid,name\n1,x\n")
    cfg = from_dict(PrepareConfig, {"source": {"format": "homedepot", "path": str(root)},
                                    "output_dir": str(tmp_path / "out")})
    with pytest.raises(CatalogFormatError, match=r"products.csv: missing required column "
                                                 r"'product_title' \(found: name, product_uid\)"):
        prepare_catalog(cfg)
    assert not (tmp_path / "out").exists()


def test_job_exit_codes(ray_local, tmp_path, capsys):
    assert job.main(["--set", "source.format=wands", "--set", f"source.path={tmp_path}/none",
                     "--set", f"output_dir={tmp_path}/o"]) == 2
    assert "file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(["--set", "source.format=nope"])


def test_synthetic_prepare_splits_and_manifest(ray_local, tmp_path):
    out = tmp_path / "syn"
    argv = ["--set", "source.num_products=1500", "--set", f"output_dir={out}"]
    assert job.main(argv) == 0
    ds = PreparedDataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    _assert_counts_balance(manifest)
    assert manifest["counts"]["products"]["accepted"] == 1500
    for rel, digest in manifest["files"].items():
        assert (out / rel).is_file() and len(digest) == 64
    splits = {s: set(ds.queries(s)["query_id"].to_pylist()) for s in ("train", "dev", "test")}
    assert not (splits["train"] & splits["dev"]) and not (splits["train"] & splits["test"])
    assert sum(map(len, splits.values())) == manifest["counts"]["queries"]["accepted"]
    for s, ids in splits.items():
        assert set(ds.judgments(s)["query_id"].to_pylist()) <= ids
    products = ds.products()
    groups = products.to_pandas().groupby("variant_group").size()
    assert groups.max() > 1  # families of variants
    # Deterministic: a second run gives the same splits and products.
    assert job.main(argv) == 0
    again = PreparedDataset(out)
    assert {s: set(again.queries(s)["query_id"].to_pylist()) for s in splits} == splits
    assert again.products().sort_by("product_id").equals(products.sort_by("product_id"))


def test_asking_for_gpus_on_a_cluster_without_any_is_a_clear_error(ray_local, tmp_path):
    from retrieval_platform.cluster import require_gpus
    from retrieval_platform.encoder.batch import EmbedConfig, embed_products
    from retrieval_platform.errors import PlatformError

    require_gpus(0, "embed.num_gpus")  # CPU only: nothing to check
    _, ds = _prepare(tmp_path, {"num_products": 200})
    with pytest.raises(PlatformError, match=r"embed.num_gpus asks for 1 GPU\(s\) but the Ray "
                                            "cluster has none"):
        embed_products(ds.products_dataset(["product_id", "text"]), "tiny",
                       EmbedConfig(num_gpus=1))
