"""Hard-negative mining: embed the catalog (Ray Data, the one encode path), search FAISS for
every training query, and keep the products of a rank window (``skip_top`` ≤ rank < ``depth``)
that are neither judged above the scale's lowest grade nor in a positive's variant group. The
very top ranks are skipped because they are mostly unlabelled positives (on Home Depot, 92 % of
zero-shot top-1 "negatives" scored within 0.1 of the positive, many plainly relevant); the
training loop samples a few of the kept ones afresh every epoch.

The negatives file is this module's: its schema (``NEGATIVES_SCHEMA``), its writer
(:func:`mine_negatives`) and its reader (:func:`read_negatives`, for
:mod:`retrieval_platform.training.examples`)."""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_platform import storage
from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.encoder.batch import EmbedConfig, embed_catalog
from retrieval_platform.encoder.model import DualEncoder, model_info, resolve_model_folder
from retrieval_platform.errors import PlatformError
from retrieval_platform.index.faiss_ops import IndexParams, build_faiss_index, search_index

log = logging.getLogger(__name__)

NEGATIVES_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("negative_ids", pa.list_(pa.string()), nullable=False),  # best-scoring first
    pa.field("negative_scores", pa.list_(pa.float32()), nullable=False),
])


@dataclass
class MineConfig:
    prepared_dir: str = "runs/data/synthetic"
    model: str = "minilm-l6"  # model folder or backbone name
    split: str = "train"
    depth: int = 50  # products retrieved per query: the window's end
    keep: int = 40  # negatives kept per query, best-scoring first (the pool stage 1 samples)
    skip_top: int = 10  # the window's start: the first ranks are often unlabelled positives
    output_path: str = "runs/negatives/synthetic.parquet"
    embed: EmbedConfig = field(default_factory=EmbedConfig)


def mine_negatives(cfg: MineConfig) -> dict[str, Any]:
    started = time.perf_counter()
    ds = PreparedDataset(cfg.prepared_dir)
    folder = resolve_model_folder(cfg.model)
    cols, xb = embed_catalog(ds.products_dataset(["product_id", "text", "variant_group"]),
                             cfg.model, cfg.embed, ["product_id", "variant_group"])
    ids, groups = cols["product_id"], cols["variant_group"]
    group_of = dict(zip(ids, groups, strict=True))

    text_of = ds.query_texts(cfg.split)
    judged = ds.qrels(cfg.split)
    scale = ds.scale
    positives = {q: set(ps) for q, ps in ds.positives(cfg.split).items()}
    not_negative = {q: {p for p, g in j.items() if g > scale.min_grade} for q, j in judged.items()}
    qids = [q for q in text_of if q in positives]
    encoder = DualEncoder.from_pretrained(folder)
    xq = encoder.encode([text_of[q] for q in qids], "query", precision=cfg.embed.precision)
    D, I = search_index(build_faiss_index(xb, IndexParams()), xq, cfg.depth, IndexParams())

    rows: dict[str, list] = defaultdict(list)
    dropped = 0
    for qi, qid in enumerate(qids):
        pos_groups = {group_of[p] for p in positives[qid] if p in group_of}
        negs, scores = [], []
        for rank, (i, d) in enumerate(zip(I[qi], D[qi], strict=True)):
            if i < 0 or rank < cfg.skip_top:
                continue
            pid = ids[i]
            if pid in not_negative[qid] or group_of[pid] in pos_groups:
                dropped += 1
                continue
            negs.append(pid)
            scores.append(float(d))
            if len(negs) == cfg.keep:
                break
        rows["query_id"].append(qid)
        rows["negative_ids"].append(negs)
        rows["negative_scores"].append(scores)
    with tempfile.TemporaryDirectory(prefix="rp-negatives-") as tmp:
        local = Path(tmp) / "negatives.parquet"
        pq.write_table(pa.table(rows, schema=NEGATIVES_SCHEMA), local)
        storage.publish_file(local, cfg.output_path)
    stats = {"queries": len(qids), "negatives": sum(map(len, rows["negative_ids"])),
             "dropped_positive_or_variant": dropped, "model_id": model_info(folder)["model_id"],
             "output_path": storage.canonical(cfg.output_path),
             "seconds": round(time.perf_counter() - started, 1)}
    log.info("mined negatives: %s", stats)
    return stats


def read_negatives(path: str | Path | None) -> dict[str, list[str]]:
    """query id -> its mined negatives, best-scoring first (empty without a path)."""
    if not path:
        return {}
    if not storage.exists(path):
        raise PlatformError(f"{path}: no hard negatives here (run data_jobs.mine_negatives)")
    table = pq.read_table(storage.fetch_file(path), columns=["query_id", "negative_ids"])
    return dict(zip(table["query_id"].to_pylist(), table["negative_ids"].to_pylist(),
                    strict=True))
