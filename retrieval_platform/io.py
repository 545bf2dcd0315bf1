"""Small filesystem helpers shared by every job: this node's cache folder, checksums, JSON,
atomic publication."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retrieval_platform.errors import PlatformError


def cache_dir() -> Path:
    """This node's cache: converted backbones, fetched models and stored objects
    (``$RETRIEVAL_PLATFORM_CACHE``, default ``~/.cache/retrieval_platform``)."""
    default = Path.home() / ".cache" / "retrieval_platform"
    return Path(os.environ.get("RETRIEVAL_PLATFORM_CACHE") or default)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksum_tree(root: str | Path) -> dict[str, str]:
    """sha256 of every file below ``root``, keyed by its path relative to ``root``."""
    root = Path(root)
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file in one step: readers see the old content or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def publish_dir(target: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it atomically becomes ``target``.

    Readers never see a half-written result: they see the old folder or the new one. On failure
    the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise PlatformError(f"{target} exists (set overwrite=true to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
