"""Storage locations: a local folder or an S3 URI (moto on 127.0.0.1), one API for both."""

from __future__ import annotations

import pytest

from retrieval_platform import storage
from retrieval_platform.errors import PlatformError


def _write_folder(folder) -> None:
    (folder / "sub").mkdir()
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x01" * 1000)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_published_folder_is_fetched_whole_and_verified(where, tmp_path, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_server")["bucket"]
        location = f"s3://{bucket}/{tmp_path.name}/folder"
    else:
        location = str(tmp_path / "folder")
    with storage.publish(location, overwrite=False) as tmp:
        _write_folder(tmp)
    listed = storage.list_files(location)
    assert {"a.txt": 5, "sub/b.bin": 2000}.items() <= listed.items()
    local = storage.fetch(location)
    assert (local / "a.txt").read_text() == "alpha"
    assert (local / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 1000
    with pytest.raises(PlatformError, match="exists"), storage.publish(location, overwrite=False):
        pass
    with storage.publish(location, overwrite=True) as tmp:  # replaced as a whole
        (tmp / "c.txt").write_text("gamma")
    assert (storage.fetch(location) / "c.txt").read_text() == "gamma"
    assert "a.txt" not in storage.list_files(location)


def test_a_remote_fetch_takes_only_what_is_asked_and_refuses_corruption(s3_server, tmp_path):
    from pyarrow import fs

    location = f"s3://{s3_server['bucket']}/{tmp_path.name}/folder"
    with storage.publish(location, overwrite=False) as tmp:
        _write_folder(tmp)
    assert storage.list_files(location)[storage.COMPLETE] > 0  # written last: the folder is whole
    part = storage.fetch(location, ["a.txt"])
    assert (part / "a.txt").is_file() and not (part / "sub").exists()
    assert storage.fetch(location) == part  # the same cache folder, completed

    # The object changes in storage behind the platform's back: its checksum no longer matches.
    s3, path = fs.FileSystem.from_uri(f"{location}/sub/b.bin")
    with s3.open_output_stream(path) as out:
        out.write(b"tampered")
    (part / "sub" / "b.bin").unlink()  # not cached: it must be downloaded again
    with pytest.raises(PlatformError, match="sha256 does not match"):
        storage.fetch(location)
    with pytest.raises(PlatformError, match=r"no _COMPLETE\.json"):
        storage.fetch(f"s3://{s3_server['bucket']}/{tmp_path.name}/nothing")


def test_small_files_and_single_files(s3_server, tmp_path):
    root = f"s3://{s3_server['bucket']}/{tmp_path.name}"
    storage.write_text(storage.join(root, "LATEST"), "v2\n")
    assert storage.read_text(f"{root}/LATEST") == "v2\n" and storage.exists(f"{root}/LATEST")
    assert not storage.exists(f"{root}/missing")
    file = tmp_path / "negatives.parquet"
    file.write_bytes(b"PAR1")
    storage.publish_file(file, f"{root}/negatives/x.parquet")
    assert not file.exists()
    assert storage.fetch_file(f"{root}/negatives/x.parquet").read_bytes() == b"PAR1"
    assert storage.canonical("runs/x").startswith("/") and storage.canonical(root) == root


def test_a_model_uploaded_with_the_cli_loads_from_s3_by_its_uri(s3_server, tmp_path):
    """`retrieval-platform storage upload` puts a local model folder in storage; every node
    then names it by its URI and loads its own verified copy."""
    import subprocess
    import sys

    from retrieval_platform.encoder.model import model_info, model_location, resolve_model_folder

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "retrieval_platform.cli", "storage", *args],
                              capture_output=True, text=True, timeout=120)

    local = resolve_model_folder("tiny")
    uri = f"s3://{s3_server['bucket']}/{tmp_path.name}/models/tiny"
    assert cli("upload", uri, str(local)).returncode == 0
    listed = cli("ls", uri)
    assert listed.returncode == 0 and "model.safetensors" in listed.stdout
    fetched = resolve_model_folder(uri)
    assert fetched != local and model_location(uri) == uri
    assert model_info(fetched)["model_id"] == model_info(local)["model_id"]
    again = cli("upload", uri, str(local))  # exists: --overwrite replaces it
    assert again.returncode == 2 and "exists" in again.stderr


def test_a_catalog_in_s3_is_prepared_into_s3_and_read_back(ray_local, s3_server, tmp_path):
    """The raw catalog a user keeps in a bucket, prepared (Ray Data) into another prefix; the
    prepared dataset is read back from there, with every rejected record kept."""
    from pyarrow import fs

    from retrieval_platform.catalog.dataset import PreparedDataset
    from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
    from retrieval_platform.config import from_dict
    from tests.catalog_files import write_homedepot

    expected = write_homedepot(tmp_path / "hd")
    root = f"s3://{s3_server['bucket']}/{tmp_path.name}"
    s3, prefix = fs.FileSystem.from_uri(f"{root}/raw")
    for file in (tmp_path / "hd").iterdir():
        with s3.open_output_stream(f"{prefix}/{file.name}") as out:
            out.write(file.read_bytes())
    manifest = prepare_catalog(from_dict(PrepareConfig, {
        "source": {"format": "homedepot", "path": f"{root}/raw"},
        "output_dir": f"{root}/prepared"}))
    assert manifest["counts"]["products"]["accepted"] == expected["products_ok"]
    assert storage.exists(f"{root}/prepared/{storage.COMPLETE}")
    ds = PreparedDataset(f"{root}/prepared")
    assert ds.location == f"{root}/prepared"
    assert ds.products().num_rows == expected["products_ok"]
    assert ds.judgments().num_rows == expected["judgments_ok"]
    rejected = manifest["counts"]["products"]["rejected"] + manifest["counts"]["judgments"][
        "rejected"]
    assert "rejects/part-00000.parquet" in storage.list_files(f"{root}/prepared") and rejected
