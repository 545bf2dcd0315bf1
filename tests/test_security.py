"""Security properties: loopback binding by default, no unsafe deserialisation, safetensors."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from retrieval_platform.encoder.model import DualEncoder, ModelLoadError, resolve_model_folder
from tests.helpers import REPO

CODE = [p for d in ("retrieval_platform", "data_jobs", "train_jobs", "serve_apps", "bench")
        for p in (REPO / d).rglob("*.py")]


@pytest.mark.parametrize(("pattern", "why"), [
    (r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(", "pickle of data read from disk or network"),
    (r"allow_pickle\s*=\s*True", "numpy pickle"),
    (r"\byaml\.load\(", "yaml.load (use yaml.safe_load)"),
    (r"torch\.load\((?!.*weights_only=True)", "torch.load without weights_only=True"),
    (r"(?<![\w.])eval\(|(?<![\w.])exec\(", "eval / exec"),
])
def test_no_unsafe_deserialisation(pattern, why):
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in CODE
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert not offenders, f"{why}: {offenders}"


def test_services_bind_to_loopback_by_default():
    from retrieval_platform.cluster import ClusterConfig, head_command

    for path in [*REPO.glob("serve_apps/*.yaml"), *REPO.rglob("configs/**/*.yaml")]:
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "http_options" in data:
            assert data["http_options"]["host"] == "127.0.0.1", path
    assert "--dashboard-host=127.0.0.1" in head_command(ClusterConfig())
    control = (REPO / "retrieval_platform" / "serving" / "control.py").read_text()
    assert 'host: str = "127.0.0.1"' in control


def test_weights_load_only_from_safetensors(tmp_path):
    """A folder with pickled weights (pytorch_model.bin) only is refused, not unpickled."""
    model = DualEncoder.from_pretrained(resolve_model_folder("tiny"))
    folder = tmp_path / "pickled"
    model.backbone.config.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    torch.save(model.backbone.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        DualEncoder.from_pretrained(folder)
