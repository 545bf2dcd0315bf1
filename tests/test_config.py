"""Typed configuration: errors name the key; overrides; every YAML in the repo loads."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from retrieval_platform.config import ConfigError, apply_overrides, from_dict, load_config
from tests.helpers import REPO


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_from_dict_builds_nested_and_coerces_ints_to_floats():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": 1, "mode": "b"}, "tags": ["t"]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.mode == "b" and cfg.tags == ["t"] and cfg.limit is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "inner": {"lrr": 1}}, "inner.lrr: unknown key"),
        ({"name": "x", "inner": {"lr": "fast"}}, "inner.lr: expected a number"),
        ({"name": "x", "inner": {"mode": "c"}}, "inner.mode: 'c' is not one of"),
        ({}, "name: required"),
        ({"name": "x", "limit": True}, "limit: expected an integer"),
        ({"name": "x", "tags": "t"}, "tags: expected a list"),
    ],
)
def test_from_dict_errors_name_the_dotted_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(Outer, data)


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides({"name": "x"}, ["inner.lr=1e-5", "tags=[a, b]", "limit=null"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.lr == 1e-5 and cfg.tags == ["a", "b"] and cfg.limit is None
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["inner.lr"])
    listed = apply_overrides({"steps": [{"a": 1}, {"a": 2}]}, ["steps.1.a=5", "steps.0=x"])
    assert listed == {"steps": ["x", {"a": 5}]}
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"steps": [{"a": 1}]}, ["steps.3.a=5"])


def test_load_config_reports_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner: {lr: oops}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: inner.lr"):
        load_config(Outer, path)
    assert load_config(Outer, path, ["inner.lr=0.5"]).inner.lr == 0.5


def _yaml_files():
    skip = {".venv", "runs", ".git", "node_modules"}
    return sorted(
        p for p in REPO.rglob("*.yaml")
        if not skip.intersection(p.relative_to(REPO).parts)
    )


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_in_the_repo_opens_with_its_command_and_loads(path):
    """Each YAML's first line is the command that runs it; the file validates against the
    config type of that command (jobs: their dataclass; Serve: Ray's schema + our app args;
    cluster.yaml: Ray's own cluster-config validation)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path} must open with the command that runs it"
    data = yaml.safe_load(path.read_text())
    if (m := re.search(r"python -m ([\w.]+)", first)) and "--config" in first:
        module = importlib.import_module(m.group(1))
        load_config(module.CONFIG, path)
    elif m := re.search(r"python (bench/\w+\.py) --config", first):  # a benchmark's config
        spec = importlib.util.spec_from_file_location("bench_script", REPO / m.group(1))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        cfg = load_config(module.CONFIG, path)
        if hasattr(module, "validate"):
            module.validate(cfg)
    elif "retrieval-platform pipeline" in first:
        from retrieval_platform.pipeline import PipelineConfig

        for smoke in (False, True):  # every step, full and smoke-sized, loads
            cfg = load_config(PipelineConfig, path, [f"smoke={str(smoke).lower()}"])
            for step in cfg.steps:
                module = importlib.import_module(step.job)
                load_config(module.CONFIG, REPO / step.config, cfg.step_overrides(step))
    elif "serve " in first:
        from ray.serve.schema import ServeDeploySchema

        from serve_apps.retrieval_app import AppArgs

        schema = ServeDeploySchema.model_validate(data)
        assert schema.http_options.host == "127.0.0.1"
        for app in schema.applications:
            AppArgs.model_validate(app.args)
    elif "ray up" in first:
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(data))
    else:
        pytest.fail(f"{path}: unrecognised command line {first!r}")


def test_grafana_dashboard_uses_only_metrics_the_service_exports():
    """Every rp_ metric a panel queries is defined by a deployment (a renamed metric would
    leave an empty panel)."""
    dashboard = json.loads((REPO / "docs/grafana/retrieval_platform_dashboard.json").read_text())
    queried = {m for p in dashboard["panels"] for t in p["targets"]
               for m in re.findall(r"ray_(rp_\w+?)(?:_bucket|_sum|_count)?\b", t["expr"])}
    source = "".join((REPO / "retrieval_platform/serving" / f).read_text()
                     for f in ("deployments.py", "writer.py"))
    defined = set(re.findall(r'(?:Histogram|Counter)\(\s*"(rp_\w+)"', source))
    assert queried and queried <= defined, queried - defined


def test_a_smoke_run_writes_under_its_own_name_whoever_names_it():
    """A later full run must never resume a smoke run's checkpoints: ``{name}`` is
    ``NAME-smoke`` in a smoke run, also when ``--name`` sets the name after loading."""
    from retrieval_platform.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, REPO / "configs/synthetic/pipeline.yaml", ["smoke=true"])
    assert cfg.fill("{name}") == "synthetic-smoke"
    cfg.name = "mydata"  # what `retrieval-platform pipeline --name mydata --smoke` does
    assert cfg.fill("{name}") == "mydata-smoke"
    cfg.smoke = False
    assert cfg.fill("{name}") == "mydata"
