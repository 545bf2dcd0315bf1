"""Experiments on a running application over real HTTP: sticky arms answering with their own
version, a ramp, a stop and a promotion under load with no failed request, interleaving, the
impression log holding every answered request once (also while a replica is killed), events,
the analysis job on the log, and bad experiments refused before anything changes."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from retrieval_platform.experiments import control
from retrieval_platform.experiments.analysis import AnalyzeConfig, analyze_log
from retrieval_platform.experiments.arms import ExperimentError, key_hash
from retrieval_platform.experiments.eventlog import read_log
from retrieval_platform.index.store import IndexLoadError
from retrieval_platform.serving.app import AppArgs, ExperimentArgs
from retrieval_platform.serving.control import (
    app_config,
    apply,
    deployed_app,
    serve_config,
    served_versions,
)
from retrieval_platform.serving.search import LocalSearcher
from tests.chaos import kill_serve_replica
from tests.helpers import free_port, tiny_versions

APP = "experiments"
QUERIES = ["red running shoes", "stainless steel kettle", "phone case", "cordless drill 18V"]


@pytest.fixture(scope="module")
def versions(ray_local, tmp_path_factory) -> dict[str, Path]:
    return tiny_versions(tmp_path_factory.mktemp("experiments"), {"v1": 0, "v2": 1})


@pytest.fixture(scope="module")
def local(versions) -> dict[str, LocalSearcher]:
    return {v: LocalSearcher(path) for v, path in versions.items()}


@pytest.fixture(scope="module")
def service(versions, tmp_path_factory):
    from ray import serve

    log_dir = tmp_path_factory.mktemp("impressions") / "log"
    port = free_port()
    serve.shutdown()  # a Serve left by an earlier module keeps its own port: start afresh
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(index=str(versions["v1"]), encoder={"cpus": 0.2, "max_replicas": 1},
                   shard_cpus=0.05, lexical_cpus=0.05, ingress_cpus=0.05,
                   request_timeout_s=5.0,
                   impressions={"path": str(log_dir), "flush_interval_s": 0.2})
    apply(serve_config([app_config(args, name=APP)], port=port))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)
    yield {"client": client, "log": log_dir}
    client.close()
    serve.shutdown()


def _ids(hits) -> list[str]:
    return [h["product_id"] for h in hits]


def _arms(**weights: float) -> list[dict]:
    return [{"name": name, "index": index, "weight": w}
            for name, (index, w) in weights.items()]


class Load:
    """Requests from random users in a thread until stopped: every answer kept."""

    def __init__(self, client: httpx.Client, users: int = 50) -> None:
        self.client, self.users = client, users
        self.seen: list[tuple[int, dict | str, str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        rng = random.Random(0)
        deadline = time.monotonic() + 240  # bounded, whatever happens
        while not self.stop.is_set() and time.monotonic() < deadline:
            q, user = rng.choice(QUERIES), f"user-{rng.randrange(self.users)}"
            r = self.client.post("/search", json={"query": q, "k": 5, "user_id": user})
            self.seen.append((r.status_code, r.json() if r.status_code == 200 else r.text,
                              q, user))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)
        self.stop.set()
        self.thread.join()

    def answers(self) -> list[tuple[dict, str, str]]:
        failed = [s for s in self.seen if s[0] != 200]
        assert not failed, failed[:3]
        return [(body, q, user) for _, body, q, user in self.seen]


def _logged(log_dir: Path, timeout_s: float = 10.0) -> list[str]:
    time.sleep(0.6)  # past the flush interval (0.2 s)
    deadline = time.monotonic() + timeout_s
    while True:
        ids = read_log(str(log_dir))[0]["request_id"].to_pylist()
        if time.monotonic() > deadline or ids:
            return ids
        time.sleep(0.2)


def test_an_experiment_runs_ramps_stops_and_promotes_without_a_failed_request(
        service, versions, local):
    client = service["client"]
    expected = {v: {q: _ids(local[v].search(q, 5)) for q in QUERIES} for v in local}
    assert expected["v1"] != expected["v2"]
    before = client.post("/search", json={"query": QUERIES[0], "k": 5}).json()
    assert before["experiment"] is None and before["arm"] is None and before["version"] == "v1"
    with Load(client) as started:
        control.start(ExperimentArgs(name="e1", arms=_arms(
            control=(str(versions["v1"]), 50), new=(str(versions["v2"]), 50))), app_name=APP)
    arm_of: dict[str, str] = {}
    for body, q, user in started.answers():
        if body["experiment"] == "e1":
            assert arm_of.setdefault(user, body["arm"]) == body["arm"]  # sticky
            assert body["assignment"] == "key"
            assert body["version"] == {"control": "v1", "new": "v2"}[body["arm"]]
        assert _ids(body["results"]) == expected[body["version"]][q]
    assert set(arm_of.values()) == {"control", "new"}
    # a header is a key too; no key: a random arm, said so
    by_header = client.post("/search", json={"query": "kettle"},
                            headers={"X-User-Id": "user-7"}).json()
    by_body = client.post("/search", json={"query": "kettle", "user_id": "user-7"}).json()
    assert by_header["arm"] == by_body["arm"] and by_header["assignment"] == "key"
    keyless = client.post("/search", json={"query": "kettle"}).json()
    assert keyless["assignment"] == "random" and keyless["arm"] in ("control", "new")

    with Load(client) as ramped:
        control.ramp({"new": 100, "control": 0}, app_name=APP)
    tail = ramped.answers()[-5:]
    assert all(body["arm"] == "new" for body, _, _ in tail)
    with Load(client) as stopped:
        control.stop("control", app_name=APP)
    assert all(body["version"] == "v2" for body, _, _ in stopped.answers()[-5:])
    config, position = deployed_app(APP)
    loaded, active, experiment = served_versions(config["applications"][position])
    assert set(loaded) == {"v1", "v2"} and [a.name for a in experiment.arms] == ["new"]
    with Load(client) as promoted:
        control.promote("new", app_name=APP)
    last, _, _ = promoted.answers()[-1]
    assert last["experiment"] is None and last["version"] == "v2"
    loaded, active, experiment = served_versions(deployed_app(APP)[0]["applications"][position])
    assert (set(loaded), active, experiment) == ({"v2"}, "v2", None)
    # every answered request of all of it is in the log, once
    answered = [body["request_id"] for load in (started, ramped, stopped, promoted)
                for body, _, _ in load.answers()]
    logged = _logged(service["log"])
    assert len(logged) == len(set(logged))
    assert set(answered) <= set(logged)


def test_bad_experiments_change_nothing(service, versions, tmp_path):
    client = service["client"]
    config, position = deployed_app(APP)
    state = served_versions(config["applications"][position])
    active = str(versions[state[1]])
    bad_dim = tmp_path / "v-dim"
    shutil.copytree(versions["v1"], bad_dim)
    manifest = json.loads((bad_dim / "manifest.json").read_text())
    manifest["version"], manifest["dim"] = "v-dim", manifest["dim"] * 2  # wider than its model
    (bad_dim / "manifest.json").write_text(json.dumps(manifest))
    cases = [
        (_arms(a=(active, 0), b=(active, 0)), ExperimentError, "sum to a positive"),
        (_arms(a=(active, 1), b=(str(tmp_path / "nowhere"), 1)), Exception, "nowhere"),
        (_arms(a=(active, 1), b=(str(bad_dim), 1)), IndexLoadError, "dimensional"),
    ]
    for arms, error, message in cases:
        with pytest.raises(error, match=message):
            control.start(ExperimentArgs(name="bad", arms=arms), app_name=APP)
        assert served_versions(deployed_app(APP)[0]["applications"][position]) == state
    with pytest.raises(ExperimentError, match="no experiment"):
        control.ramp({"a": 1}, app_name=APP)
    assert client.post("/search", json={"query": "kettle"}).status_code == 200


def test_interleaving_events_and_the_log_while_a_replica_dies(service, versions, local,
                                                              tmp_path):
    client = service["client"]
    active = served_versions(deployed_app(APP)[0]["applications"][0])[1]
    other = "v1" if active == "v2" else "v2"
    control.start(ExperimentArgs(name="e2", method="interleave", arms=_arms(
        a=(str(versions[active]), 1), b=(str(versions[other]), 1))), app_name=APP)
    body = client.post("/search", json={"query": QUERIES[1], "k": 6, "user_id": "u1"}).json()
    assert body["arm"] == "a+b" and body["version"] == f"{active}+{other}"
    ids = _ids(body["results"])
    union = set(_ids(local[active].search(QUERIES[1], 6))) | set(
        _ids(local[other].search(QUERIES[1], 6)))
    assert len(ids) == len(set(ids)) == 6 and set(ids) <= union

    # a shard replica dies under load: answers are 200 or 503, and each 200 is logged once
    outcomes = []
    kill_serve_replica(APP, "Shard_1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = client.post("/search", json={"query": QUERIES[len(outcomes) % 4], "k": 5,
                                         "user_id": f"u{len(outcomes) % 9}"})
        outcomes.append(r)
        if r.status_code == 200 and len(outcomes) > 8:
            break
        time.sleep(0.1)
    assert {r.status_code for r in outcomes} <= {200, 503}
    answered = [r.json()["request_id"] for r in outcomes if r.status_code == 200]
    logged = _logged(service["log"])
    assert set(answered) <= set(logged) and len(logged) == len(set(logged))

    # events on the interleaved answer: acknowledged once written; bad ones are 422
    events = [{"request_id": body["request_id"], "product_id": ids[0], "type": "click"},
              {"request_id": body["request_id"], "product_id": ids[0], "type": "order"}]
    r = client.post("/events", json={"events": events})
    assert r.status_code == 202 and r.json() == {"accepted": 2}
    assert read_log(str(service["log"]))[1].num_rows == 2  # written before the answer
    for bad in ({"events": []}, {"events": [events[0] | {"type": "like"}]},
                {"events": [{"request_id": "x"}]}, {"events": events * 200}):
        r = client.post("/events", json=bad)
        assert r.status_code in (413, 422) and "detail" in r.json()

    report = analyze_log(AnalyzeConfig(log=str(service["log"]), output_dir=str(tmp_path),
                                       experiment="e2", replicates=200))
    assert report.interleaving is not None and report.interleaving.impressions == 1
    assert (tmp_path / "report.md").read_text().startswith("Interleaving a vs b: 1 impressions")
    mine = read_log(str(service["log"]))[0].to_pylist()
    first = next(r for r in mine if r["request_id"] == body["request_id"])
    assert first["key_hash"] == key_hash("u1") and first["teams"] and first["arm"] == "a+b"
    control.stop(app_name=APP)
    assert client.post("/search", json={"query": "x"}).json()["experiment"] is None


def test_an_experiment_in_the_app_args_is_checked_and_read_back(versions, tmp_path):
    """``experiment:`` in the Serve config starts one at deploy; the state the CLI reads from
    such a config is that experiment, checked as ``experiment start`` checks it."""
    v1, v2 = str(versions["v1"]), str(versions["v2"])
    args = AppArgs(index=v1, experiment={"name": "e0", "arms": _arms(
        control=(v1, 3), new=(v2, 1))})
    loaded, active, experiment = served_versions(app_config(args))
    assert loaded == {"v1": v1, "v2": v2} and active == "v1"
    assert [(a.name, a.version, a.weight) for a in experiment.arms] == [
        ("control", "v1", 3), ("new", "v2", 1)]
    clone = tmp_path / "v1"
    shutil.copytree(versions["v1"], clone)  # the same version name in another folder
    clash = AppArgs(index=v1, experiment={"name": "e0", "arms": _arms(a=(str(clone), 1))})
    with pytest.raises(ExperimentError, match="another folder"):
        served_versions(app_config(clash))
