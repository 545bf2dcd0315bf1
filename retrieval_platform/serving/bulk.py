"""Applying a file (or a folder, or a bucket prefix) of catalog changes to a served index: the
body of ``data_jobs.apply_changes``.

Each line is one change, as an item of ``POST /products:bulk``:
``{"op": "upsert" | "patch" | "delete", "product_id": ..., "product": {...}}``. Lines are
checked as the HTTP API checks them; the upserts are embedded with Ray Data (the index build's
actor pool, model and precision) and the changes go to the served application's one writer in
chunks, in file order, so they are validated against the live catalog, logged and replicated
exactly as HTTP writes are. Nothing is dropped silently: a line that is not JSON, not a valid
change, or refused by the writer (an unknown id on a patch or delete) is kept with its reason
in the rejects file, and the summary counts every line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from retrieval_platform import storage
from retrieval_platform.catalog.live import WriteOp, WriteResult
from retrieval_platform.catalog.validate import RowError, validate_product
from retrieval_platform.config import from_dict
from retrieval_platform.encoder.batch import EmbedConfig, embed_catalog
from retrieval_platform.errors import PlatformError
from retrieval_platform.index.changelog import model_key
from retrieval_platform.index.faiss_ops import first_dims
from retrieval_platform.index.store import load_manifest
from retrieval_platform.serving.app import WRITER
from retrieval_platform.serving.schemas import BulkItem, write_op

log = logging.getLogger(__name__)


@dataclass
class ApplyChangesConfig:
    changes: str = "changes.jsonl"  # a JSONL file, or a folder / URI prefix of *.jsonl files
    app: str = "retrieval"  # the Serve application whose index takes the changes
    chunk_size: int = 500  # changes per writer call (one log segment each)
    rejects: str | None = None  # a JSONL file for rejected lines (default: printed only)
    embed: EmbedConfig | None = None  # default: how the served version embedded its products


@dataclass
class ApplyChangesSummary:
    lines: int
    applied: int
    rejected: int
    position: int  # the log position after the last change
    by_result: dict[str, int]


def apply_changes(cfg: ApplyChangesConfig) -> ApplyChangesSummary:
    from ray import serve

    from retrieval_platform.serving.control import deployed_config, served_versions

    apps = {a["name"]: a for a in deployed_config()["applications"]}
    if cfg.app not in apps:
        raise PlatformError(f"no application named {cfg.app!r} is deployed ({sorted(apps)})")
    versions, active, _ = served_versions(apps[cfg.app])
    manifest = load_manifest(versions[active])
    lines = list(_lines(cfg.changes))
    ops: list[WriteOp | WriteResult] = [_parse(n, line) for n, line in lines]
    upserts = [i for i, op in enumerate(ops) if isinstance(op, WriteOp) and op.op == "upsert"]
    texts: dict[int, str] = {}
    for i in upserts:
        try:  # the writer validates again; here only to render the text to embed
            texts[i] = validate_product({"product_id": ops[i].product_id, **ops[i].fields}
                                        )["text"]
        except RowError as exc:
            ops[i] = WriteResult(ops[i].product_id, "upsert", 422, "rejected", error=str(exc))
    if texts:
        embed = cfg.embed or from_dict(EmbedConfig, manifest.config.get("embed") or {})
        table = pa.table({"row": list(texts), "product_id": [str(i) for i in texts],
                          "text": list(texts.values())})
        import ray.data

        cols, xb = embed_catalog(ray.data.from_arrow(table), manifest.model.path, embed, ["row"])
        xb = first_dims(xb, manifest.served_dim)  # (n, index dim)
        key = model_key(manifest.model.model_id, manifest.dim)
        for i, vector in zip(cols["row"], xb, strict=True):
            ops[i] = WriteOp("upsert", ops[i].product_id, ops[i].fields,
                             {key: np.asarray(vector, np.float32)})
    writer = serve.get_deployment_handle(WRITER, app_name=cfg.app)
    results: list[WriteResult | None] = [op if isinstance(op, WriteResult) else None for op in ops]
    pending = [i for i, op in enumerate(ops) if isinstance(op, WriteOp)]
    for start in range(0, len(pending), cfg.chunk_size):
        chunk = pending[start : start + cfg.chunk_size]
        for i, result in zip(chunk, writer.write.remote([ops[i] for i in chunk]).result(),
                             strict=True):
            results[i] = result
    done = [r for r in results if r is not None]
    rejected = [(n, line, r) for (n, line), r in zip(lines, done, strict=True) if r.status >= 400]
    if cfg.rejects:
        storage.write_text(cfg.rejects, "".join(
            json.dumps({"line": n, "reason": r.error, "status": r.status, "raw": line}) + "\n"
            for n, line, r in rejected))
    by_result: dict[str, int] = {}
    for r in done:
        by_result[r.result] = by_result.get(r.result, 0) + 1
    summary = ApplyChangesSummary(
        lines=len(lines), applied=len(done) - len(rejected), rejected=len(rejected),
        position=max((r.seq or 0 for r in done), default=0), by_result=by_result)
    log.info("applied %d of %d changes to %s (log position %d)", summary.applied, summary.lines,
             cfg.app, summary.position)
    return summary


def _lines(location: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line of the file, or of every *.jsonl file below
    the folder or prefix, in name order."""
    files = [location] if location.endswith(".jsonl") else [
        storage.join(location, n) for n in sorted(storage.list_files(location))
        if n.endswith(".jsonl")]
    if not files:
        raise PlatformError(f"{location}: no *.jsonl files of changes")
    out = []
    for f in files:
        try:
            text = storage.read_text(f)
        except (OSError, PlatformError) as exc:
            raise PlatformError(f"{f}: cannot read the changes ({exc})") from None
        out += [(n, line) for n, line in enumerate(storage.jsonl_lines(text), 1) if line.strip()]
    return out


def _parse(n: int, line: str) -> WriteOp | WriteResult:
    """A line as a write, or its rejection (422, with the line number and what is wrong)."""
    try:
        data: Any = json.loads(line)
    except ValueError as exc:
        return WriteResult("", "upsert", 422, "rejected", error=f"line {n}: not JSON ({exc})")
    try:
        item = BulkItem.model_validate(data)
    except ValidationError as exc:
        pid = str(data.get("product_id", "")) if isinstance(data, dict) else ""
        return WriteResult(pid, "upsert", 422, "rejected",
                           error=f"line {n}: {exc.errors(include_url=False, include_input=False)}")
    return write_op(item)
