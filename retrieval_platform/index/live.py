"""A served version that takes writes: the immutable base segment (the version's FAISS shard
and BM25 index, as built) plus what the change log added since, merged at query time as Lucene
and Vespa merge segments:

- **tombstones** over base rows: a deleted product, and the old entry of an upserted one;
- **patched metadata** (price, in-stock) of base and delta rows, which filters read at once;
- a **delta segment** of upserted products: their vectors (searched exactly, beside the base
  shard's index) and their BM25 term counts.

Every shard replica applies every change (:meth:`LiveShard.apply`); an upsert lands in its
product's home shard (:func:`home_shard`, a hash of the id) and tombstones the product in any
other shard, so the shards agree without talking to each other.

BM25 of new documents (:class:`LiveLexical`): a delta document is scored with the base index's
own formula (bm25s, Lucene variant) and the base's **frozen corpus statistics** (N, document
frequencies, average length): its score is what the base index would give it had it been
built with it (a test checks this), and adding documents does not move the scores of the
others. A term the base has never seen counts with document frequency 0. Compaction
(:mod:`retrieval_platform.index.compact`) rebuilds the statistics from the whole catalog.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval_platform.index.bm25 import BM25Retriever
from retrieval_platform.index.changelog import Change, ChangeLog
from retrieval_platform.index.faiss_ops import brute_force_topk, merge_topk, search_index
from retrieval_platform.index.store import CatalogFilter, LoadedShard

log = logging.getLogger(__name__)

DELTA_ROW0 = 1 << 40  # the global row of a delta product: DELTA_ROW0 + its change's seq
META_FIELDS = ("product_id", "title", "category", "price", "in_stock")
PATCHABLE = ("price", "in_stock")  # metadata a patch changes without re-embedding
OVERFETCH_LIMIT = 512  # tombstones up to this: search k + dead deeper and drop them


def home_shard(product_id: str, num_shards: int) -> int:
    """The shard an upserted product lives in (stable across processes and runs)."""
    digest = hashlib.blake2b(product_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def _meta_of(record: dict[str, Any]) -> dict[str, Any]:
    return {f: record.get(f) for f in META_FIELDS}


class LiveRows:
    """A base segment's row metadata (``product_id, title, category, price, in_stock``) with
    patches and tombstones; local rows 0..n-1."""

    def __init__(self, meta: pa.Table) -> None:
        n = meta.num_rows
        self.ids: list[str] = meta["product_id"].to_pylist()
        self.pos = {p: i for i, p in enumerate(self.ids)}
        self.titles = meta["title"].to_pylist()
        self.categories = meta["category"].to_pylist()
        self.prices = meta["price"].to_pylist()
        self.in_stock = (meta["in_stock"].to_pylist() if "in_stock" in meta.column_names
                         else [None] * n)
        self.dead = np.zeros(n, dtype=bool)
        self._table: pa.Table | None = meta.select(
            [c for c in META_FIELDS if c in meta.column_names])

    def __len__(self) -> int:
        return len(self.ids)

    def live(self, product_id: str) -> int | None:
        i = self.pos.get(product_id)
        return None if i is None or self.dead[i] else i

    def kill(self, product_id: str) -> None:
        i = self.live(product_id)
        if i is not None:
            self.dead[i] = True

    def patch(self, product_id: str, fields: dict[str, Any]) -> None:
        i = self.live(product_id)
        if i is None:
            return
        if "price" in fields:
            self.prices[i] = fields["price"]
        if "in_stock" in fields:
            self.in_stock[i] = fields["in_stock"]
        self._table = None

    def table(self) -> pa.Table:
        if self._table is None or "in_stock" not in self._table.column_names:
            self._table = pa.table({"product_id": self.ids, "title": self.titles,
                                    "category": self.categories,
                                    "price": pa.array(self.prices, pa.float64()),
                                    "in_stock": pa.array(self.in_stock, pa.bool_())})
        return self._table

    def allowed(self, filters: CatalogFilter | None) -> np.ndarray | None:
        """(n,) bool of the rows a request may return; None: all of them."""
        if filters is None or filters.empty:
            return ~self.dead if self.dead.any() else None
        return filters.mask(self.table()) & ~self.dead

    def record(self, i: int) -> dict[str, Any]:
        return {"product_id": self.ids[i], "title": self.titles[i],
                "category": self.categories[i], "price": self.prices[i],
                "in_stock": self.in_stock[i]}


class DeltaSegment:
    """Products upserted since the base, in arrival order; a later change to one tombstones
    its entry (an upsert appends a new one)."""

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self.ids: list[str] = []
        self.rows: list[int] = []  # global rows (DELTA_ROW0 + seq)
        self.records: list[dict[str, Any]] = []
        self.alive: list[bool] = []
        self.pos: dict[str, int] = {}  # live product -> entry
        self.at_row: dict[int, int] = {}  # global row -> entry
        self._vectors = np.zeros((0, dim or 0), np.float32)
        self.count = 0

    def add(self, product_id: str, row: int, record: dict[str, Any],
            vector: np.ndarray | None = None) -> None:
        self.kill(product_id)
        if vector is not None:
            if self.count == len(self._vectors):  # amortised growth
                grown = np.zeros((max(64, 2 * self.count), self.dim), np.float32)
                grown[: self.count] = self._vectors[: self.count]
                self._vectors = grown
            self._vectors[self.count] = vector
        self.pos[product_id] = self.at_row[row] = len(self.ids)
        self.ids.append(product_id)
        self.rows.append(row)
        self.records.append(_meta_of(record))
        self.alive.append(True)
        self.count += 1

    def kill(self, product_id: str) -> None:
        i = self.pos.pop(product_id, None)
        if i is not None:
            self.alive[i] = False

    def patch(self, product_id: str, fields: dict[str, Any]) -> None:
        i = self.pos.get(product_id)
        if i is not None:
            self.records[i] = self.records[i] | {k: fields[k] for k in PATCHABLE if k in fields}

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[: self.count]  # (count, d)

    def live_entries(self, filters: CatalogFilter | None) -> np.ndarray:
        """Entries a request may return (alive, passing the filters)."""
        keep = np.fromiter(self.alive, bool, self.count)
        if filters is not None and not filters.empty and keep.any():
            keep &= filters.mask(pa.Table.from_pylist(self.records, schema=_DELTA_SCHEMA))
        return np.flatnonzero(keep)


_DELTA_SCHEMA = pa.schema([("product_id", pa.string()), ("title", pa.string()),
                           ("category", pa.string()), ("price", pa.float64()),
                           ("in_stock", pa.bool_())])


class _LiveSegment:
    """What a shard and the lexical index share: a base's rows (``meta``), a delta segment,
    the log position applied and the one rule for applying a change; ``_add`` puts an
    upserted product into the delta."""

    meta: LiveRows
    delta: DeltaSegment
    position: int
    lock: threading.Lock

    def _add(self, c: Change) -> None:
        raise NotImplementedError

    def apply(self, changes: Iterable[Change]) -> int:
        """Apply the changes after ``position``; returns how many were new."""
        applied = 0
        with self.lock:
            for c in changes:
                if c.seq <= self.position:
                    continue  # a replay: already here
                if c.op == "patch":
                    self.meta.patch(c.product_id, c.record or {})
                    self.delta.patch(c.product_id, c.record or {})
                else:  # delete, or upsert: the product's old entry goes, wherever it is
                    self.meta.kill(c.product_id)
                    self.delta.kill(c.product_id)
                    if c.op == "upsert":
                        self._add(c)
                self.position = c.seq
                applied += 1
        return applied


class LiveShard(_LiveSegment):
    """One shard of a version with the log's changes applied from ``position`` on; searched
    like a :class:`LoadedShard` (``search``, ``rows``: global rows, delta ones from
    :data:`DELTA_ROW0`)."""

    def __init__(self, base: LoadedShard, num_shards: int, vector_key: str,
                 position: int) -> None:
        self.base = base
        self.shard_id = base.shard_id
        self.num_shards = num_shards
        self.vector_key = vector_key
        self.position = position  # the last change applied
        self.meta = LiveRows(base.meta)
        self.delta = DeltaSegment(base.index.d)
        self.lock = threading.Lock()

    def _add(self, c: Change) -> None:
        if home_shard(c.product_id, self.num_shards) == self.shard_id:
            self.delta.add(c.product_id, DELTA_ROW0 + c.seq, c.record or {},
                           c.vector(self.vector_key))

    def search(self, xq: np.ndarray, k: int, filters: CatalogFilter | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of the live rows: the base index (tombstones and patched filters masked)
        merged with the delta segment (exact); I global rows, -1 where fewer than k."""
        with self.lock:
            D, I = self._search_base(xq, k, filters)
            entries = self.delta.live_entries(filters)
            if not entries.size:
                return D, I
            Dd, Id = brute_force_topk(xq, self.delta.vectors[entries], k)  # (nq, k)
            rows = np.asarray(self.delta.rows, np.int64)[entries]
            Id = np.where(Id >= 0, rows[np.clip(Id, 0, None)], -1)
            return merge_topk([D, Dd], [I, Id], k)

    def _search_base(self, xq: np.ndarray, k: int, filters: CatalogFilter | None
                     ) -> tuple[np.ndarray, np.ndarray]:
        dead = int(self.meta.dead.sum())
        offset = self.base.offset
        if (filters is None or filters.empty) and dead <= OVERFETCH_LIMIT:
            # few tombstones: a little deeper, then drop them (no selector to build)
            depth = min(k + dead, len(self.meta)) or 1
            D, I = search_index(self.base.index, xq, depth, self.base.params)
            if dead:
                gone = (I >= 0) & self.meta.dead[np.clip(I, 0, None)]
                D, I = np.where(gone, -np.inf, D), np.where(gone, -1, I)
                order = np.argsort(I < 0, axis=1, kind="stable")[:, :k]  # live first, in order
                D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
            D, I = _pad(D[:, :k], I[:, :k], k)
        else:
            D, I = search_index(self.base.index, xq, k, self.base.params,
                                self.meta.allowed(filters))
        return D, np.where(I >= 0, I + offset, -1)

    def rows(self, global_rows: list[int]) -> list[dict[str, Any]]:
        at = self.delta.at_row
        return [self.delta.records[at[r]] if r >= DELTA_ROW0
                else self.meta.record(r - self.base.offset) for r in global_rows]


def _pad(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if D.shape[1] >= k:
        return D, I
    extra = k - D.shape[1]
    return (np.pad(D, ((0, 0), (0, extra)), constant_values=-np.inf),
            np.pad(I, ((0, 0), (0, extra)), constant_values=-1))


class LexicalStats:
    """The frozen corpus statistics of a base BM25 index, for scoring new documents with the
    base's own formula (bm25s, Lucene variant: idf = ln(1 + (N - df + 0.5)/(df + 0.5)),
    tf part = tf / (tf + k1·(1 - b + b·|d|/avgdl)))."""

    def __init__(self, bm25: BM25Retriever, avg_doc_len: float) -> None:
        index = bm25.index
        if index.method != "lucene":
            raise ValueError(f"live BM25 scores the lucene variant, not {index.method!r}")
        self.n = int(index.scores["num_docs"])
        self.df = np.diff(np.asarray(index.scores["indptr"]))  # (vocab,) documents per term
        self.vocab: dict[str, int] = index.vocab_dict
        self.k1, self.b, self.avg_doc_len = float(index.k1), float(index.b), avg_doc_len

    def idf(self, term: str) -> float:
        t = self.vocab.get(term)
        df = int(self.df[t]) if t is not None else 0
        return math.log(1 + (self.n - df + 0.5) / (df + 0.5))

    def score(self, query_terms: list[str], doc_tf: Counter, doc_len: int) -> float:
        norm = self.k1 * ((1 - self.b) + self.b * doc_len / self.avg_doc_len)
        return float(sum(self.idf(t) * doc_tf[t] / (doc_tf[t] + norm)
                         for t in query_terms if t in doc_tf))


class LiveLexical(_LiveSegment):
    """The catalog-wide BM25 of a version with the log's changes applied: base hits (tombstones
    and patched filters masked) merged with the delta documents scored by
    :class:`LexicalStats`."""

    def __init__(self, bm25: BM25Retriever, meta: pa.Table, avg_doc_len: float,
                 position: int) -> None:
        self.bm25 = bm25
        self.meta = LiveRows(meta)
        self.stats = LexicalStats(bm25, avg_doc_len)
        self.delta = DeltaSegment()
        self.terms: dict[int, tuple[Counter, int]] = {}  # delta entry -> (tf, length)
        self.position = position
        self.lock = threading.Lock()

    def _add(self, c: Change) -> None:
        tokens = self.bm25.terms((c.record or {}).get("text") or "")
        self.terms[len(self.delta.ids)] = (Counter(tokens), len(tokens))
        self.delta.add(c.product_id, DELTA_ROW0 + c.seq, c.record or {})

    def search(self, query: str, k: int, filters: CatalogFilter | None) -> list[dict[str, Any]]:
        """Top-k hit records (product_id, title, score, category, price, in_stock, row)."""
        with self.lock:
            allowed = self.meta.allowed(filters)
            base = self.bm25.search([query], k, mask=allowed)[0]
            hits = [(score, i, self.meta.record(i))
                    for i, score in ((self.meta.pos[p], s) for p, s in base)]
            entries = self.delta.live_entries(filters)
            if entries.size:
                q = self.bm25.terms(query)
                for e in entries:
                    tf, length = self.terms[int(e)]
                    score = self.stats.score(q, tf, length)
                    if score > 0:
                        hits.append((score, self.delta.rows[e], self.delta.records[e]))
            hits.sort(key=lambda h: (-h[0], h[1]))
            return [m | {"score": float(s), "shard": None, "row": int(r)}
                    for s, r, m in hits[:k]]


class LiveTexts:
    """Every product's rendered text in a version's catalog with the log's changes applied (an
    upsert brings its text, a delete takes it away; patches never change text): what the
    reranker reads for a candidate."""

    def __init__(self, texts: dict[str, str], position: int) -> None:
        self.texts = texts
        self.position = position
        self.lock = threading.Lock()

    def apply(self, changes: Iterable[Change]) -> int:
        applied = 0
        with self.lock:
            for c in changes:
                if c.seq <= self.position:
                    continue  # a replay: already here
                if c.op == "delete":
                    self.texts.pop(c.product_id, None)
                elif c.op == "upsert":
                    self.texts[c.product_id] = (c.record or {}).get("text") or ""
                self.position = c.seq
                applied += 1
        return applied

    def get(self, product_ids: list[str], fallback: list[str]) -> list[str]:
        """The texts of ``product_ids``; one not held (yet) gets its ``fallback`` (its title)."""
        with self.lock:
            return [self.texts.get(p, f) for p, f in zip(product_ids, fallback, strict=True)]


class LogFollower:
    """Applies a change log to a live segment: once, synchronously, on start (the replay: a
    replica serves only once it has caught up), then from a daemon thread every
    ``interval_s``. ``apply`` takes a list of changes; ``position()`` says what is applied."""

    def __init__(self, changelog: ChangeLog, apply: Callable[[list[Change]], int],
                 position: Callable[[], int], interval_s: float = 0.05) -> None:
        self.log = changelog
        self.apply = apply
        self.position = position
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def catch_up(self) -> int:
        changes = list(self.log.read_after(self.position()))
        return self.apply(changes) if changes else 0

    def start(self) -> LogFollower:
        self.catch_up()
        self._thread = threading.Thread(target=self._run, daemon=True, name="log-follower")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                while changes := self.log.poll(self.position() + 1):
                    self.apply(changes)
            except Exception as exc:  # storage hiccup: retried at the next poll
                self.errors += 1
                if self.errors % 100 == 1:
                    log.warning("change log %s: %r (retrying)", self.log.location, exc)
                time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()


def load_live_shard(index_dir: str, shard_id: int) -> tuple[LiveShard, ChangeLog]:
    """Shard ``shard_id`` of a version with its catalog's change log replayed (not yet
    followed: wrap it in a :class:`LogFollower`)."""
    from retrieval_platform.index.changelog import log_location, model_key
    from retrieval_platform.index.store import load_manifest, load_shard

    manifest = load_manifest(index_dir)
    live = LiveShard(load_shard(index_dir, shard_id), len(manifest.shards),
                     model_key(manifest.model.model_id, manifest.dim), manifest.log_position)
    return live, ChangeLog(log_location(manifest.path))


def load_live_lexical(index_dir: str) -> tuple[LiveLexical, ChangeLog]:
    """The version's BM25 with its change log (see :func:`load_live_shard`)."""
    from retrieval_platform.index.changelog import log_location
    from retrieval_platform.index.store import load_bm25, load_manifest

    manifest = load_manifest(index_dir)
    bm25, meta = load_bm25(index_dir)
    if meta["product_id"].to_pylist() != bm25.product_ids:
        raise ValueError(f"{manifest.path}: BM25 documents and shard rows disagree in order")
    avg_doc_len = bm25.avg_doc_len or _avg_doc_len_of(manifest.dataset.path, bm25)
    return (LiveLexical(bm25, meta, avg_doc_len, manifest.log_position),
            ChangeLog(log_location(manifest.path)))


def load_live_texts(index_dir: str) -> tuple[LiveTexts, ChangeLog]:
    """The product texts of the catalog a version was built from, with its change log (see
    :func:`load_live_shard`)."""
    from retrieval_platform.catalog.dataset import PreparedDataset
    from retrieval_platform.index.changelog import log_location
    from retrieval_platform.index.store import load_manifest

    manifest = load_manifest(index_dir)
    products = PreparedDataset(manifest.dataset.path).products(["product_id", "text"])
    texts = dict(zip(products["product_id"].to_pylist(), products["text"].to_pylist(),
                     strict=True))
    return LiveTexts(texts, manifest.log_position), ChangeLog(log_location(manifest.path))


def _avg_doc_len_of(prepared_dir: str, bm25: BM25Retriever) -> float:
    """An index saved before BM25 recorded its average document length: recount it from the
    catalog it was built on (bm25s' own count, over the same texts)."""
    from retrieval_platform.catalog.dataset import PreparedDataset

    texts = PreparedDataset(prepared_dir).products(["text"])["text"].to_pylist()
    tokens = bm25._tokenize(texts)
    return float(np.mean([len(d) for d in tokens.ids])) if texts else 1.0
