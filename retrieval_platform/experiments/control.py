"""Running an experiment on a deployed application, in place and without dropping a request:
start, ramp, stop an arm (or the whole experiment), promote the winner.

Each operation is a sequence of ``user_config`` updates (``serving.control.apply``), as a
version swap is. Every version an arm serves is loaded on every encoder, shard and BM25 replica
*before* the ingress starts sending it traffic, and unloaded only *after* the ingress stopped;
the ingress reads the experiment once per request, so each answer comes from one consistent
assignment. Everything is checked before the first update: a bad experiment changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from retrieval_platform.errors import PlatformError
from retrieval_platform.experiments.arms import Experiment, ExperimentError
from retrieval_platform.index.store import load_manifest
from retrieval_platform.serving.app import ExperimentArgs, check_experiment
from retrieval_platform.serving.control import (
    apply,
    deployed_app,
    served_versions,
    with_versions,
    write_serve_config,
)

log = logging.getLogger(__name__)


def _state(app_name: str) -> tuple[dict, int, dict[str, str], str, Experiment | None]:
    config, position = deployed_app(app_name)
    versions, active, experiment = served_versions(config["applications"][position])
    return config, position, versions, active, experiment


def _steps(config: dict, position: int,
           steps: list[tuple[dict[str, str], str, Experiment | None]],
           save_config: str | None) -> None:
    app = config["applications"][position]
    for versions, active, experiment in steps:
        config["applications"][position] = with_versions(app, versions, active, experiment)
        apply(config)
        log.info("serving %s, experiment %s, %s loaded", active,
                 experiment.to_dict() if experiment else None, sorted(versions))
    if save_config:  # `serve deploy` of this file gives the same state
        write_serve_config(save_config, config)


def _summary(app_name: str, active: str, experiment: Experiment | None) -> dict[str, Any]:
    return {"app": app_name, "active": active,
            "experiment": experiment.to_dict() if experiment else None}


def start(args: ExperimentArgs, *, app_name: str = "retrieval",
          save_config: str | None = None) -> dict[str, Any]:
    """Load every arm's version everywhere, then send the arms their traffic."""
    config, position, versions, active, running = _state(app_name)
    if running is not None:
        raise ExperimentError(f"experiment {running.name} is running: stop it or promote an "
                              "arm first")
    experiment, arm_versions = check_experiment(args, load_manifest(versions[active]),
                                                versions)
    both = versions | arm_versions
    _steps(config, position, [(both, active, None), (both, active, experiment)], save_config)
    return _summary(app_name, active, experiment)


def ramp(weights: dict[str, float], *, app_name: str = "retrieval",
         save_config: str | None = None) -> dict[str, Any]:
    """New traffic weights for some arms (the others keep theirs)."""
    config, position, versions, active, experiment = _state(app_name)
    if experiment is None:
        raise ExperimentError("no experiment is running")
    for name in weights:
        experiment.arm(name)  # an unknown arm is an error
    ramped = Experiment(experiment.name, tuple(replace(a, weight=weights.get(a.name, a.weight))
                                               for a in experiment.arms), experiment.method)
    _steps(config, position, [(versions, active, ramped)], save_config)
    return _summary(app_name, active, ramped)


def stop(arm: str | None = None, *, app_name: str = "retrieval",
         save_config: str | None = None) -> dict[str, Any]:
    """Stop one arm (its traffic goes to the others by their weights), or the whole
    experiment (every request back to the active version); then unload what no arm serves."""
    config, position, versions, active, experiment = _state(app_name)
    if experiment is None:
        raise ExperimentError("no experiment is running")
    after: Experiment | None = None
    if arm is not None:
        experiment.arm(arm)
        left = tuple(a for a in experiment.arms if a.name != arm)
        after = Experiment(experiment.name, left, experiment.method)  # checks what is left
    keep = {active} | {a.version for a in (after.arms if after else ())}
    kept = {v: d for v, d in versions.items() if v in keep}
    _steps(config, position, [(versions, active, after), (kept, active, after)], save_config)
    return _summary(app_name, active, after)


def promote(arm: str, *, app_name: str = "retrieval",
            save_config: str | None = None) -> dict[str, Any]:
    """Serve the arm's version to every request and end the experiment; then unload the
    other versions."""
    config, position, versions, _, experiment = _state(app_name)
    if experiment is None:
        raise ExperimentError("no experiment is running")
    winner = experiment.arm(arm).version
    if winner not in versions:
        raise PlatformError(f"version {winner} of arm {arm} is not loaded")
    only = {winner: versions[winner]}
    _steps(config, position, [(versions, winner, None), (only, winner, None)], save_config)
    return _summary(app_name, winner, None)
