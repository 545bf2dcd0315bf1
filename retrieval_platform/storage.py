"""Where artefacts live: a local folder, or any pyarrow filesystem URI (``s3://bucket/prefix``,
``gs://...``, ``hdfs://...``) that every node of a cluster can reach.

Every job names its inputs and outputs by *location*: a local path or a URI. A job writes an
output folder locally and :func:`publish` makes it the location: an atomic rename on a local
disk; on object storage, an upload followed by ``_COMPLETE.json`` (each file's sha256 and size),
written last, so a reader sees a whole folder or none. :func:`fetch` gives any node a local
copy of a location: the folder itself when it is local; otherwise a download into this node's
cache, each file checked against ``_COMPLETE.json``, reused while the folder is unchanged.

S3 credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` for MinIO or moto), set on
every node of the cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from retrieval_platform.errors import PlatformError
from retrieval_platform.io import cache_dir, publish_dir, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE.json"  # on object storage: a folder's checksums, written last


def is_remote(location: str | Path) -> bool:
    """A URI with a scheme (s3://, gs://, ...) other than file://."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(location: str | Path, *parts: str) -> str:
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(_local(location), *parts))


def canonical(location: str | Path) -> str:
    """The form of ``location`` that means the same on every node: a URI as it is, a local
    path made absolute (it then names this machine's disk)."""
    return str(location) if is_remote(location) else str(Path(_local(location)).absolute())


def _local(location: str | Path) -> str:
    text = str(location)
    return text[len("file://"):] if text.startswith("file://") else text


def _filesystem(location: str):  # -> (pyarrow.fs.FileSystem, path inside it)
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(location)
    except (OSError, ValueError) as exc:
        raise PlatformError(f"{location}: not a storage URI this node can open ({exc})") from None


def arrow_filesystem(location: str | Path):  # -> (pyarrow.fs.FileSystem, path inside it)
    """The pyarrow filesystem of ``location`` (a local disk or object storage) and its path."""
    if is_remote(location):
        return _filesystem(str(location))
    from pyarrow import fs

    return fs.LocalFileSystem(), str(Path(_local(location)).absolute())


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return Path(_local(location)).exists()
    from pyarrow import fs

    filesystem, path = _filesystem(str(location))
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def read_text(location: str | Path) -> str:
    if not is_remote(location):
        return Path(_local(location)).read_text(encoding="utf-8")
    filesystem, path = _filesystem(str(location))
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        raise PlatformError(f"{location}: not found") from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text: split on "\n" only. ``str.splitlines`` also splits on
    U+0085, U+2028 and others, which JSON leaves unescaped inside strings (a product id from a
    user may hold them), and would cut a record in two."""
    return [line.rstrip("\r") for line in text.split("\n")]


def write_text(location: str | Path, text: str) -> None:
    """Write a small file in one step: readers see the old content or the new one."""
    if is_remote(location):
        filesystem, path = _filesystem(str(location))
        with filesystem.open_output_stream(path) as stream:  # one PUT: atomic on S3
            stream.write(text.encode())
        return
    path = Path(_local(location))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a file in one step (one PUT on object storage, a rename on a local disk)."""
    if is_remote(location):
        filesystem, path = _filesystem(str(location))
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    path = Path(_local(location))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def list_files(location: str | Path) -> dict[str, int]:
    """Every file below ``location``: its path relative to it -> its size in bytes."""
    if not is_remote(location):
        root = Path(_local(location))
        return {str(p.relative_to(root)): p.stat().st_size
                for p in sorted(root.rglob("*")) if p.is_file()}
    from pyarrow import fs

    filesystem, path = _filesystem(str(location))
    infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    return {info.path[len(path):].lstrip("/"): info.size
            for info in sorted(infos, key=lambda i: i.path) if info.type == fs.FileType.File}


@contextmanager
def publish(location: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty local folder; on success it becomes ``location`` as a whole (see the
    module docstring). On failure nothing at ``location`` changes."""
    if not is_remote(location):
        with publish_dir(_local(location), overwrite=overwrite) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="rp-publish-") as tmp:
        yield Path(tmp)
        upload_folder(Path(tmp), str(location), overwrite=overwrite)


def upload_folder(folder: Path, location: str, *, overwrite: bool) -> None:
    """Copy a local folder to a remote location, ``_COMPLETE.json`` last."""
    filesystem, path = _filesystem(location)
    if list_files(location):
        if not overwrite:
            raise PlatformError(f"{location} exists (set overwrite=true to replace it)")
        filesystem.delete_dir_contents(path, missing_dir_ok=True)
    complete = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        complete[rel] = {"sha256": sha256_file(file), "size": file.stat().st_size}
        _upload_file(filesystem, file, f"{path}/{rel}")
    with filesystem.open_output_stream(f"{path}/{COMPLETE}") as stream:
        stream.write(json.dumps({"files": complete}, indent=1, sort_keys=True).encode())
    log.info("uploaded %d files to %s", len(complete), location)


def publish_file(file: Path, location: str | Path) -> None:
    """Move a finished local file to ``location`` (a rename, or an upload and delete)."""
    if is_remote(location):
        filesystem, path = _filesystem(str(location))
        _upload_file(filesystem, file, path)
        file.unlink()
        return
    target = Path(_local(location))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(file, target.with_name(f".{target.name}.tmp"))
    os.replace(target.with_name(f".{target.name}.tmp"), target)


def _upload_file(filesystem, file: Path, path: str) -> None:
    with file.open("rb") as src, filesystem.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _cache_root() -> Path:
    return cache_dir() / "storage"


def _cache_folder(location: str, content: str, kind: str = "") -> Path:
    """This node's cache folder for ``location`` as described by ``content`` (its checksums or
    its listing): a changed folder gets a new one."""
    key = hashlib.sha256(location.encode()).hexdigest()[:12]
    version = hashlib.sha256(content.encode()).hexdigest()[:12]
    return _cache_root() / kind / f"{key}-{version}"


def _download(filesystem, path: str, local: Path, where: str, sha256: str | None = None) -> None:
    """One object to ``local`` through a temporary file (no reader sees half of it), checked
    against ``sha256`` when there is one."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with filesystem.open_input_stream(path) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise PlatformError(f"{where}: its sha256 does not match {COMPLETE} (corrupted in "
                                "storage or in transit)")
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, FileNotFoundError):
            raise PlatformError(f"{where}: not found") from None
        raise
    os.replace(tmp, local)


def _sync(location: str, target: Path, sizes: dict[str, int],
          sha256s: dict[str, str] | None = None) -> None:
    """Download the files of ``location`` named in ``sizes`` into ``target`` where missing or
    of another size; replicas on one node share the download (a lock)."""
    from filelock import FileLock

    filesystem, path = _filesystem(location)
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        for rel, size in sizes.items():
            local = target / rel
            if not (local.is_file() and local.stat().st_size == size):
                _download(filesystem, f"{path}/{rel}", local, f"{location}/{rel}",
                          sha256s[rel] if sha256s else None)


def fetch(location: str | Path, files: Iterable[str] | None = None) -> Path:
    """A local folder holding ``location`` (all its files, or ``files`` of it).

    Local: the folder itself. Remote: this node's cached copy, downloaded where missing or
    changed, every file checked against the folder's ``_COMPLETE.json``."""
    if not is_remote(location):
        return Path(_local(location)).absolute()
    location = str(location).rstrip("/")
    try:
        complete_text = read_text(join(location, COMPLETE))
    except PlatformError:
        raise PlatformError(
            f"{location}: no {COMPLETE} there (not a folder written by the platform, or still "
            "being written); copy local folders up with `retrieval-platform storage upload`"
        ) from None
    listed: dict[str, dict] = json.loads(complete_text)["files"]
    wanted = sorted(listed) if files is None else sorted(set(files))
    missing = [f for f in wanted if f not in listed]
    if missing:
        raise PlatformError(f"{location}: has no {missing[0]} (per its {COMPLETE})")
    target = _cache_folder(location, complete_text)
    _sync(location, target, {r: listed[r]["size"] for r in wanted},
          {r: listed[r]["sha256"] for r in wanted})
    return target


def fetch_raw(location: str | Path) -> Path:
    """A local copy of a folder written by something else (a raw catalog a user put in a
    bucket): every file, cached by the folder's listing (paths, sizes), so an unchanged folder
    is not downloaded again. No checksums exist to check: ``fetch`` is for our own folders."""
    if not is_remote(location):
        return Path(_local(location)).absolute()
    location = str(location).rstrip("/")
    listed = list_files(location)
    if not listed:
        raise PlatformError(f"{location}: no files there")
    target = _cache_folder(location, json.dumps(listed, sort_keys=True), "raw")
    if not (target / COMPLETE).is_file():
        _sync(location, target, listed)
        (target / COMPLETE).write_text(json.dumps({"listing": listed}))  # the copy is whole
    return target


def fetch_file(location: str | Path) -> Path:
    """A local copy of one file (downloaded afresh into this node's cache when remote)."""
    if not is_remote(location):
        return Path(_local(location)).absolute()
    filesystem, path = _filesystem(str(location))
    local = _cache_folder(str(location), "", "files") / Path(path).name
    _download(filesystem, path, local, str(location))
    return local
