"""What several test files share (imported from here, not from conftest.py, whose body pytest
runs as a plugin of its own)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOMEDEPOT = Path(os.environ.get("HOMEDEPOT_DIR", REPO.parent / "shared" / "data" / "homedepot"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_versions(root: Path, seeds: dict[str, int], *, num_products: int = 400,
                  num_shards: int = 2) -> dict[str, Path]:
    """A prepared synthetic catalog at ``root/data`` and one index version per name, each
    with its own model (the tiny random backbone under that seed, ``root/model{seed}``)."""
    from retrieval_platform.catalog.prepare import PrepareConfig, prepare_catalog
    from retrieval_platform.config import from_dict
    from retrieval_platform.encoder.backbones import build_tiny_backbone
    from retrieval_platform.encoder.model import DualEncoder
    from retrieval_platform.index.build import BuildIndexConfig, build_version

    prepare_catalog(from_dict(PrepareConfig, {"source": {"num_products": num_products,
                                                         "seed": 2},
                                              "output_dir": str(root / "data")}))
    out = {}
    for version, seed in seeds.items():
        build_tiny_backbone(root / f"backbone{seed}", seed=seed)
        model = DualEncoder.from_pretrained(root / f"backbone{seed}", pooling="last")
        model.settings.base = f"tiny{seed}"
        model.save(root / f"model{seed}")
        build_version(from_dict(BuildIndexConfig, {
            "prepared_dir": str(root / "data"), "model": str(root / f"model{seed}"),
            "output_root": str(root / "indexes"), "version": version,
            "num_shards": num_shards,
            "embed": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 100}}))
        out[version] = root / "indexes" / version
    return out
