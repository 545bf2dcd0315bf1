"""The change log of a live catalog: every acknowledged write, in order, in the index's storage.

    <root>/_changes/
        000000000001.jsonl      changes 1..k (one JSON object a line), written as one file
        000000000008.jsonl      changes k+1.. : a segment is named by its first sequence number

A segment is written whole before any of its writes is acknowledged (a local file is written,
fsynced and hard-linked into place, which refuses a name that exists; on object storage one PUT,
which readers see whole or not at all), so nothing acknowledged is lost and nothing half
written is read. Sequence numbers are global and dense (1, 2, ...): a reader that has applied
up to ``n`` looks for the segment named ``n + 1`` and nothing else, so following the log costs
one small read per poll, locally or on S3, however long the log grows. A replica that starts
(a restart, a new autoscaled one, another node) loads its version and replays the log from
the version's ``log_position`` (the last change the version's build contains): its state is its
peers' state. Replays are idempotent: a change at or below a replica's position is skipped.

The log lives beside the versions (``<root>/``), not inside one: it belongs to the catalog, so a
compacted version (built from the catalog with changes 1..S folded in, ``log_position`` S)
replays S+1.. and a swap to it carries every later write.

Upserts carry their product vector per model (``"<model_id>:<dim>"``), embedded once by the
writer with the served model's own encode path; replicas add it as it is, never re-embed.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval_platform import storage
from retrieval_platform.errors import PlatformError

Op = Literal["upsert", "patch", "delete"]
LOG_FOLDER = "_changes"
SEGMENT_DIGITS = 12


class ChangeLogError(PlatformError):
    """The log cannot be read or appended (a gap, a conflicting writer, a corrupted segment)."""


def model_key(model_id: str, dim: int) -> str:
    """The key of an upsert's vector for the index versions built with ``model_id`` at ``dim``
    (a compacted version keeps its model: the vectors in the log stay valid for it)."""
    return f"{model_id}:{dim}"


def encode_vector(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode()


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class Change:
    """One acknowledged write. ``record``: an upsert's whole validated product (with its
    rendered ``text``), a patch's changed fields (metadata only: a patch that changes the text
    is logged as an upsert), nothing for a delete."""

    seq: int
    op: Op
    product_id: str
    record: dict[str, Any] | None = None
    vectors: dict[str, str] = field(default_factory=dict)  # model_key -> base64 float32
    acked_at: float = 0.0  # unix time the writer logged it (visibility is measured from it)

    def vector(self, key: str) -> np.ndarray:
        if key not in self.vectors:
            raise ChangeLogError(f"change {self.seq} ({self.product_id}) has no vector for "
                                 f"model {key} (it has {sorted(self.vectors)}): a version of "
                                 "another model cannot replay this log; compact with it")
        return decode_vector(self.vectors[key])

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Change:
        return cls(**json.loads(line))


def log_location(index_dir: str) -> str:
    """The change log of the catalog a version folder belongs to: ``_changes`` beside it."""
    text = str(index_dir).rstrip("/")
    if storage.is_remote(text):
        return text.rsplit("/", 1)[0] + "/" + LOG_FOLDER
    return str(Path(text).absolute().parent / LOG_FOLDER)


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:0{SEGMENT_DIGITS}d}.jsonl"


class ChangeLog:
    """Append and read one catalog's change log (a local folder or a storage URI)."""

    def __init__(self, location: str) -> None:
        self.location = storage.canonical(location)
        self.remote = storage.is_remote(self.location)

    def segments(self) -> list[int]:
        """First sequence numbers of the segments, ascending."""
        if not storage.exists(self.location):
            return []
        names = storage.list_files(self.location)
        return sorted(int(n[: -len(".jsonl")]) for n in names
                      if n.endswith(".jsonl") and n[: -len(".jsonl")].isdigit())

    def last_seq(self) -> int:
        """The last sequence number written (0: an empty log)."""
        firsts = self.segments()
        if not firsts:
            return 0
        return self._read(firsts[-1])[-1].seq

    def append(self, changes: list[Change]) -> None:
        """Write ``changes`` (consecutive sequence numbers) as one segment, durably; raises
        :class:`ChangeLogError` if a segment of that name exists (another writer)."""
        if not changes:
            return
        first = changes[0].seq
        if [c.seq for c in changes] != list(range(first, first + len(changes))):
            raise ChangeLogError("a segment's sequence numbers must be consecutive")
        body = "".join(c.to_json() + "\n" for c in changes).encode()
        target = storage.join(self.location, _segment_name(first))
        if self.remote:
            # one PUT: readers see the segment whole or not at all. S3 has no create-if-absent
            # here, so the one-writer rule is the deployment's (one replica), not the store's.
            storage.write_bytes(target, body)
            return
        folder = Path(self.location)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)  # fails if the name exists: two writers cannot both succeed
        except FileExistsError:
            raise ChangeLogError(f"{target} exists: another writer appended change {first}") \
                from None
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new name survives a power loss too
        finally:
            os.close(dir_fd)

    def _read(self, first_seq: int) -> list[Change]:
        target = storage.join(self.location, _segment_name(first_seq))
        try:
            text = storage.read_text(target)
        except (FileNotFoundError, PlatformError):
            return []
        try:
            changes = [Change.from_json(line) for line in storage.jsonl_lines(text)
                       if line.strip()]
        except (ValueError, TypeError) as exc:
            raise ChangeLogError(f"{target}: corrupted segment ({exc})") from None
        if not changes or changes[0].seq != first_seq:
            raise ChangeLogError(f"{target}: corrupted segment (first change is not {first_seq})")
        return changes

    def poll(self, next_seq: int) -> list[Change]:
        """The segment that starts at ``next_seq``, if it has been written (else [])."""
        if not self.remote and not (Path(self.location) / _segment_name(next_seq)).is_file():
            return []
        return self._read(next_seq)

    def read_after(self, position: int) -> Iterator[Change]:
        """Every change after ``position`` (a replay), in order."""
        firsts = self.segments()
        start = max((f for f in firsts if f <= position + 1), default=None)
        if start is None and firsts and firsts[0] > position + 1:
            raise ChangeLogError(f"{self.location}: the log starts at change {firsts[0]}; a "
                                 f"version at position {position} cannot replay it")
        expected = position + 1
        for first in (f for f in firsts if start is not None and f >= start):
            if first > expected:
                raise ChangeLogError(f"{self.location}: changes {expected}..{first - 1} missing")
            for change in self._read(first):
                if change.seq >= expected:
                    expected = change.seq + 1
                    yield change
