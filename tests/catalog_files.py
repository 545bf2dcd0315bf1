"""Small source files in each published format, with known good and bad records."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_homedepot(root: Path) -> dict[str, int]:
    """Home Depot: 6 product records (1 empty title, 1 duplicate id, 1 bad UTF-8, 1 extra field)
    and 8 judgment records (bad grade, out-of-range grade, unknown product, empty query)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "products.csv").write_bytes(
        b"product_uid,product_title\n"
        b"100001,Simpson Strong-Tie 12-Gauge Angle\n"
        b"100002,BEHR Premium Textured DeckOver 1-gal. Tugboat\n"
        b'100003,""\n'
        b"100001,Duplicate Of The First\n"
        b"100004,Caf\xe9 Table\n"
        b"100005,Delta Vero Shower Trim,extra\n"
        b'100006,"Whirlpool 1.9 cu. ft. Over the Range Microwave, Stainless"\n'
    )
    (root / "judgments.csv").write_text(
        "id,product_uid,product_title,search_term,relevance\n"
        "1,100001,Simpson Strong-Tie 12-Gauge Angle,l bracket,2.5\n"
        "2,100002,BEHR Premium Textured DeckOver,deck over,3.0\n"
        "3,100006,Whirlpool,microwave,2.33\n"
        "4,100001,Simpson,deck over,1.0\n"
        "5,100002,BEHR,l bracket,high\n"
        "6,100002,BEHR,microwave,3.5\n"
        "7,999999,Ghost,microwave,2\n"
        "8,100006,Whirlpool,,2\n"
    )
    return {"products_read": 7, "products_ok": 3, "judgments_read": 8, "judgments_ok": 4}


ESCI_PRODUCT_COLUMNS = ["product_id", "product_title", "product_description",
                        "product_bullet_point", "product_brand", "product_color",
                        "product_locale"]


def write_esci(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    products = pa.table({
        "product_id": ["B01", "B02", "B03", "B01"],
        "product_title": ["Nike Running Shoe", "Phone Case <b>Blue</b>", "Kettle", "Nike JP"],
        "product_description": ["<p>Light &amp; fast</p>", None, "1.7 L", None],
        "product_bullet_point": ["Mesh upper", "Slim", None, None],
        "product_brand": ["Nike", "Acme", "Kitchy", "Nike"],
        "product_color": ["Black", "Blue", None, "Black"],
        "product_locale": ["us", "us", "us", "jp"],
    })
    examples = pa.table({
        "example_id": [0, 1, 2, 3, 4, 5],
        "query": ["running shoes", "running shoes", "phone case", "phone case", "kettle", "kutsu"],
        "query_id": [10, 10, 11, 11, 12, 13],
        "product_id": ["B01", "B02", "B02", "B01", "B03", "B01"],
        "product_locale": ["us", "us", "us", "us", "us", "jp"],
        "esci_label": ["E", "I", "E", "C", "X", "E"],
        "small_version": [1, 1, 1, 1, 1, 1],
        "large_version": [1, 1, 1, 1, 1, 1],
        "split": ["train"] * 6,
    })
    pq.write_table(products, root / "shopping_queries_dataset_products.parquet")
    pq.write_table(examples, root / "shopping_queries_dataset_examples.parquet")


def write_wands(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "product.csv").write_text(
        "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\t"
        "product_features\trating_count\taverage_rating\treview_count\n"
        "0\tsolid wood platform bed\tBeds\tFurniture / Bedroom Furniture / Beds\tgood bed\t"
        "color:brown|material:wood\t15\t4.5\t15\n"
        "1\tsquare pillow cover\tPillows\tDecor / Pillows\t\tsize:18x18\t\t\t\n"
        "2\t\tRugs\tDecor\t\t\t\t\t\n"
    )
    (root / "query.csv").write_text(
        "query_id\tquery\tquery_class\n0\twood bed\tBeds\n1\tpillow cover\tPillows\n"
    )
    (root / "label.csv").write_text(
        "id\tquery_id\tproduct_id\tlabel\n0\t0\t0\tExact\n1\t0\t1\tIrrelevant\n"
        "2\t1\t1\tPartial\n3\t1\t0\tMaybe\n4\t1\t2\tExact\n"
    )
