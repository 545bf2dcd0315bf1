"""The impression and event log of an experiment: Parquet on the storage location.

    {root}/impressions/day=YYYY-MM-DD/arm=NAME/part-{writer}-{n}.parquet
    {root}/events/day=YYYY-MM-DD/part-{writer}-{n}.parquet

Impressions (one row per answered search) are buffered in memory and written in batches by a
background flush: a request never waits for storage and never fails because of it. The buffer
is bounded: past ``max_buffered`` rows new impressions are dropped and counted, not queued
without end. Events (click, add-to-cart, order) are acknowledged only once their file is
written (a group commit: concurrent posts share one file), so an acknowledged event is never
lost. Each file is written in one step (a rename on disk, one PUT on object storage), so a
reader sees whole files only.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from retrieval_platform import storage

log = logging.getLogger(__name__)

EVENT_TYPES = ("click", "add_to_cart", "order")
INTERLEAVED_SEP = "+"  # an interleaved impression's arm: "A+B", A's team first


@dataclass
class Impression:
    """One answered search, as the shopper saw it."""

    request_id: str
    time: datetime
    experiment: str | None
    key_hash: str | None  # a hash of the user or session id (never the id itself)
    assignment: str | None  # key | random (None: no experiment)
    arm: str  # the arm that answered; "A+B" when arms A and B were interleaved
    version: str
    query: str
    mode: str
    product_ids: list[str]
    scores: list[float]
    teams: list[str] | None = None  # interleaving: the arm credited with each position


@dataclass
class Event:
    request_id: str
    product_id: str
    type: str  # EVENT_TYPES
    time: datetime


IMPRESSION_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("time", pa.timestamp("us", tz="UTC")),
    ("experiment", pa.string()), ("key_hash", pa.string()), ("assignment", pa.string()),
    ("arm", pa.string()), ("version", pa.string()), ("query", pa.string()),
    ("mode", pa.string()), ("product_ids", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float32())), ("teams", pa.list_(pa.string())),
])
EVENT_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("product_id", pa.string()), ("type", pa.string()),
    ("time", pa.timestamp("us", tz="UTC")),
])


def now() -> datetime:
    return datetime.now(UTC)


def _table(rows: Sequence[Impression | Event], schema: pa.Schema) -> pa.Table:
    names = [f.name for f in fields(rows[0])] if rows else schema.names
    columns = {n: [getattr(r, n) for r in rows] for n in names}
    return pa.Table.from_pydict(columns, schema=schema)


class EventLog:
    """The log of one writer (an ingress replica): ``writer`` keeps its file names apart."""

    def __init__(self, root: str, *, writer: str | None = None,
                 max_buffered: int = 100_000) -> None:
        self.root = storage.canonical(root)
        self.writer = writer or uuid.uuid4().hex[:12]
        self.max_buffered = max_buffered
        self._pending: list[Impression] = []
        self._lock = threading.Lock()  # the buffer is filled on the event loop, flushed off it
        self._flushing = threading.Lock()
        self._files = 0
        self.dropped = 0
        self.written = 0
        self.write_errors = 0

    def add(self, impression: Impression) -> bool:
        """Buffer one impression; False when the buffer is full (it is dropped and counted)."""
        with self._lock:
            if len(self._pending) >= self.max_buffered:
                self.dropped += 1
                return False
            self._pending.append(impression)
            return True

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write every buffered impression (one file per day and arm); the rows written. On a
        storage error the rows go back to the buffer (within its bound) for the next flush."""
        with self._flushing:
            with self._lock:
                rows, self._pending = self._pending, []
            if not rows:
                return 0
            groups: dict[tuple[str, str], list[Impression]] = {}
            for r in rows:
                groups.setdefault((r.time.strftime("%Y-%m-%d"), r.arm), []).append(r)
            done = 0
            try:
                for (day, arm), part in groups.items():
                    self._write(_table(part, IMPRESSION_SCHEMA),
                                "impressions", f"day={day}", f"arm={arm}")
                    done += len(part)
                    groups[(day, arm)] = []
            except Exception as exc:  # storage down: keep what was not written
                self.write_errors += 1
                log.warning("impression log: write failed (%r); %d rows kept for the next "
                            "flush", exc, len(rows) - done)
                left = [r for part in groups.values() for r in part]
                with self._lock:
                    room = max(0, self.max_buffered - len(self._pending))
                    self.dropped += max(0, len(left) - room)
                    self._pending = left[:room] + self._pending
            self.written += done
            return done

    def write_events(self, events: Sequence[Event]) -> int:
        """Write ``events`` now (one file per day); raises if storage does not take them."""
        by_day: dict[str, list[Event]] = {}
        for e in events:
            by_day.setdefault(e.time.strftime("%Y-%m-%d"), []).append(e)
        for day, part in by_day.items():
            self._write(_table(part, EVENT_SCHEMA), "events", f"day={day}")
        return len(events)

    def _write(self, table: pa.Table, *partition: str) -> None:
        with self._lock:
            self._files += 1
            n = self._files
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        name = f"part-{self.writer}-{n:06d}-{uuid.uuid4().hex[:6]}.parquet"
        storage.write_bytes(storage.join(self.root, *partition, name), buffer.getvalue())


def _read(root: str, kind: str, schema: pa.Schema) -> pa.Table:
    filesystem, path = storage.arrow_filesystem(storage.join(root, kind))
    from pyarrow import fs

    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return schema.empty_table()
    dataset = ds.dataset(path, filesystem=filesystem, format="parquet", schema=schema,
                         partitioning=ds.partitioning(flavor="hive"))
    return dataset.to_table(columns=schema.names)


def read_log(root: str) -> tuple[pa.Table, pa.Table]:
    """(impressions, events) of the log at ``root``, every day and arm."""
    root = storage.canonical(root)
    return _read(root, "impressions", IMPRESSION_SCHEMA), _read(root, "events", EVENT_SCHEMA)


