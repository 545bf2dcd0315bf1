"""The README and the YAML headers say only what the code bears out: every config file they name
exists and loads, and every ``--set`` key they name is a key of the config it is set on."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
import shlex
from pathlib import Path
from typing import get_type_hints

import pytest

from retrieval_platform.config import load_config
from tests.helpers import REPO

DOCS = [REPO / "README.md"]
HEADERS = [*sorted(p for p in (REPO / "configs").rglob("*.yaml")), REPO / "serve_apps/config.yaml"]
COMMAND = re.compile(r"(python -m [\w.]+|retrieval-platform pipeline)\s+(.*)")
SHELL_VARS = {"$R": "/tmp/runs", "$PWD": "/tmp"}


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) of every job or pipeline command in ``text``: code blocks with
    their line continuations joined, and inline code."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in text.splitlines():
        for chunk in re.split(r"`", line):  # inline code stands alone
            if m := COMMAND.search(chunk):
                args = m.group(2)
                for var, value in SHELL_VARS.items():
                    args = args.replace(var, value)
                try:
                    words = shlex.split(args.replace("…", ""), comments=True)
                except ValueError:
                    continue
                found.append((m.group(1), words))
    return found


def _options(words: list[str]) -> tuple[str | None, list[str]]:
    config, sets = None, []
    for flag, value in itertools.pairwise(words):
        if flag == "--config":
            config = value
        elif flag == "--set":
            sets.append(value)
    return config, sets


def _config_class(program: str):
    if program == "retrieval-platform pipeline":
        from retrieval_platform.pipeline import PipelineConfig

        return PipelineConfig
    return importlib.import_module(program.removeprefix("python -m ")).CONFIG


def _all_commands():
    cases = []
    for path in DOCS:
        cases += [(path, *c) for c in _commands(path.read_text())]
    for path in HEADERS:
        cases += [(path, *c) for c in _commands(path.read_text().splitlines()[0])]
    return cases


@pytest.mark.parametrize(("where", "program", "words"), _all_commands(),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v)[:40])
def test_every_documented_command_loads_its_config_with_its_overrides(where, program, words):
    config, sets = _options(words)
    if config is None:  # a command without a config file: its defaults and overrides
        load_config(_config_class(program), None, sets) if sets else None
        return
    assert (REPO / config).is_file(), f"{where.name} names {config}, which does not exist"
    load_config(_config_class(program), REPO / config, sets)


def _keys(cls, prefix: str = "") -> set[str]:
    keys = set()
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def test_every_set_key_the_readme_names_exists_in_a_job_config():
    """Prose such as ``--set optim.lr=1e-5`` names a key of some job's (or the pipeline's)
    config."""
    from retrieval_platform.pipeline import PipelineConfig

    modules = [f"{pkg}.{p.stem}" for pkg in ("data_jobs", "train_jobs")
               for p in (REPO / pkg).glob("*.py") if p.stem != "__init__"]
    known = _keys(PipelineConfig)
    for module in modules:
        known |= _keys(importlib.import_module(module).CONFIG)
    named = set()
    for path in DOCS:
        named |= set(re.findall(r"--set ([\w.]+)=", path.read_text()))
    assert named and named <= known, f"keys named but not defined: {sorted(named - known)}"


def test_every_config_file_the_readme_names_exists():
    named = set(re.findall(r"\b((?:configs|serve_apps)/[\w/.-]+\.yaml)", "\n".join(
        p.read_text() for p in DOCS)))
    assert named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing
