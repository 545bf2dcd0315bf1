"""Deploying the application declaratively (as ``serve deploy`` does) and swapping versions.

The Serve config keeps ``args`` fixed and carries the served versions in per-deployment
``user_config`` overrides. Serve applies a change of ``user_config`` alone in place: every
replica's ``reconfigure`` runs, no replica restarts. A swap takes three such updates:

1. load the new version next to the old one on every encoder, shard and BM25 replica;
2. flip the ingress to the new version (each request is answered by one version end to end);
3. unload the old version.

Each step waits until Serve reports every deployment updated to exactly that user_config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from retrieval_platform.errors import PlatformError
from retrieval_platform.experiments.arms import Experiment
from retrieval_platform.index.store import load_manifest
from retrieval_platform.serving.app import (
    ENCODER,
    INGRESS,
    LEXICAL,
    RERANKER,
    WRITER,
    AppArgs,
    check_experiment,
    check_version,
    shard_name,
    version_user_configs,
)

log = logging.getLogger(__name__)

IMPORT_PATH = "serve_apps.retrieval_app:build_app"


def app_config(args: AppArgs, *, name: str = "retrieval", route_prefix: str = "/") -> dict:
    return {"name": name, "route_prefix": route_prefix, "import_path": IMPORT_PATH,
            "args": args.model_dump(mode="json")}


def serve_config(apps: list[dict], *, host: str = "127.0.0.1", port: int = 8000,
                 proxy_location: str = "HeadOnly") -> dict:
    """``proxy_location``: "HeadOnly" (one machine, or nodes that share an address) or
    "EveryNode" (a proxy on each node, so that losing one loses no endpoint: clients list one
    URL per node, serving/client.py)."""
    return {"proxy_location": proxy_location, "http_options": {"host": host, "port": port},
            "applications": apps}


def write_serve_config(path: str | Path, config: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# serve deploy {path}\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def deployed_config() -> dict:
    """The Serve config currently applied on the cluster (all applications)."""
    details = _client().get_serve_details()
    apps = [a["deployed_app_config"] for a in details.get("applications", {}).values()
            if a.get("deployed_app_config")]
    return {"proxy_location": details.get("proxy_location", "HeadOnly"),
            "http_options": details.get("http_options", {}), "applications": apps}


def _backends(app: dict) -> list[str]:
    manifest = load_manifest(app["args"]["index"])
    names = [ENCODER, *(shard_name(i) for i in range(len(manifest.shards)))]
    if app["args"].get("lexical", True):
        names.append(LEXICAL)
    if app["args"].get("write_key_env") or app["args"].get("write_key_file"):
        names.append(WRITER)  # it embeds upserts with every loaded version's model
    if app["args"].get("reranker"):
        names.append(RERANKER)  # it reads each version's catalog texts
    return names


def with_versions(app: dict, versions: dict[str, str], active: str,
                  experiment: Experiment | None = None) -> dict:
    """``app`` with deployment overrides loading ``versions`` and serving ``active`` (and
    ``experiment``'s arms, their versions among ``versions``)."""
    manifest = load_manifest(versions[active])
    loaded, ingress = version_user_configs(manifest, versions, experiment)
    overrides = {d["name"]: d for d in app.get("deployments") or []}
    for name in _backends(app):
        overrides[name] = overrides.get(name, {"name": name}) | {"user_config": loaded}
    overrides[INGRESS] = overrides.get(INGRESS, {"name": INGRESS}) | {"user_config": ingress}
    return app | {"deployments": list(overrides.values())}


def served_versions(app: dict) -> tuple[dict[str, str], str, Experiment | None]:
    """(loaded versions, active version, the running experiment) of a deployed application
    config."""
    overrides = {d["name"]: d.get("user_config") for d in app.get("deployments") or []}
    if overrides.get(INGRESS) and overrides.get(ENCODER):
        ingress = overrides[INGRESS]
        experiment = ingress.get("experiment")
        return (dict(overrides[ENCODER]["versions"]), ingress["active"],
                Experiment.from_dict(experiment) if experiment else None)
    # as built from its args (AppArgs.experiment, if any, was checked when it was built)
    args = AppArgs.model_validate(app["args"])
    manifest = load_manifest(args.index)
    loaded, ingress = version_user_configs(manifest)
    if args.experiment is None:
        return loaded["versions"], manifest.version, None
    # checked when the app was built: read back, not loaded again
    experiment, versions = check_experiment(args.experiment, manifest, load=False)
    return loaded["versions"] | versions, manifest.version, experiment


def deployed_app(app_name: str) -> tuple[dict, int]:
    """(the whole deployed Serve config, the position of ``app_name`` in it)."""
    config = deployed_config()
    position = next((i for i, a in enumerate(config["applications"])
                     if a["name"] == app_name), None)
    if position is None:
        raise PlatformError(f"no application named {app_name!r} is deployed")
    return config, position


def apply(config: dict, *, timeout_s: float = 600.0) -> None:
    """Apply a whole Serve config and wait until every deployment runs its target user_config."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = _client()
    client.deploy_apps(schema)
    expected = {
        app["name"]: {d["name"]: d.get("user_config") for d in app.get("deployments") or []
                      if "user_config" in d}
        for app in config["applications"]
    }
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        details = client.get_serve_details().get("applications", {})
        if all(_app_ready(details.get(name), wanted) for name, wanted in expected.items()):
            return
        for name in expected:
            app = details.get(name) or {}
            if app.get("status") == "DEPLOY_FAILED":
                raise PlatformError(f"application {name} failed to deploy: {app.get('message')}")
        time.sleep(0.25)
    raise TimeoutError(f"applications {list(expected)} not updated within {timeout_s:.0f}s")


def _app_ready(app: dict | None, wanted: dict[str, Any]) -> bool:
    if not app or app.get("status") != "RUNNING" or not app.get("deployments"):
        return False
    for name, deployment in app["deployments"].items():
        if name in wanted and deployment["deployment_config"].get("user_config") != wanted[name]:
            return False
        if deployment["status"] != "HEALTHY" \
                or deployment.get("status_trigger") == "CONFIG_UPDATE_STARTED":
            return False
    return True


def swap_version(new_index: str, *, app_name: str = "retrieval") -> dict[str, Any]:
    """Serve ``new_index`` instead of the active version, without dropping a request."""
    manifest = check_version(new_index)
    config, position = deployed_app(app_name)
    app = config["applications"][position]
    versions, old, experiment = served_versions(app)
    if experiment is not None:
        raise PlatformError(f"experiment {experiment.name} is running: promote an arm or stop "
                            "it (retrieval-platform experiment) before a swap")
    if len(load_manifest(versions[old]).shards) != len(manifest.shards):
        raise PlatformError("a swap keeps the shard count; this version has "
                            f"{len(manifest.shards)} shards: deploy it as a new application")
    new = manifest.version
    both = versions | {new: manifest.path}
    for loaded, active in ((both, old), (both, new), ({new: manifest.path}, new)):
        config["applications"][position] = with_versions(app, loaded, active)
        apply(config)
        log.info("swap %s -> %s: serving %s with %s loaded", old, new, active, sorted(loaded))
    return {"app": app_name, "from": old, "to": new, "model_id": manifest.model.model_id}
