"""A real multi-node Ray cluster on this machine: a head and worker nodes, each a separate
``ray start`` with its own cache folder, all artefacts in S3 (moto on 127.0.0.1), every step
submitted through the job API with the code as its working_dir (the user's path, via
``retrieval-platform pipeline``). Faults: a worker node killed during stage 1 (the run resumes
from its checkpoint in storage), and a node killed under load while two replicas of each shard
and of the ingress serve (no failed and no wrong answer from a retrying client).

Run it with ``./test.sh -m multinode`` (CI does); set RP_MULTINODE_REPORT=FILE to keep the
run's record (nodes, where each job ran, the storage listing, answers, wall times).
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from retrieval_platform.serving.client import SearchClient, SearchError
from tests.helpers import REPO, free_port

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(1800)]
WRITE_KEY = "multinode-write-key-0123"

RAY = str(Path(sys.executable).with_name("ray"))
# every Python process of a node records what it opens of another machine's (node_audit/)
AUDIT = Path(__file__).parent / "node_audit"


class Node:
    """One ``ray start --block`` process group: killing it is losing the machine."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], root: Path) -> None:
        self.name = name
        self.cache = root / name / "cache"
        self.cache.mkdir(parents=True)
        self.log = (root / f"{name}.log").open("w")
        # a temp dir of its own (sessions, sockets, logs), short: socket paths have a limit
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"rpn-{name}-", dir="/tmp"))
        self.audit_log = root / name / "audit.log"
        audit = {"PYTHONPATH": os.pathsep.join(
                     [str(AUDIT), *filter(None, [env.get("PYTHONPATH")])]),
                 "RP_AUDIT_NODE": name, "RP_AUDIT_ROOT": str(root),
                 "RP_AUDIT_SUBMITTER": str(REPO / "runs")}
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--resources={json.dumps({name: 1})}", f"--temp-dir={self.temp_dir}", *args],
            env=env | audit | {"RETRIEVAL_PLATFORM_CACHE": str(self.cache)},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    from ray.util.state import list_nodes

    root = tmp_path_factory.mktemp("cluster")
    gcs, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        k: v for k, v in s3_server.items() if k.startswith("AWS_")} | {
        # token authentication, as a real cluster runs it (the token is the test's own)
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    ports = iter(range(23000, 30000, 1000))

    def worker_ports() -> list[str]:
        low = next(ports)
        return [f"--min-worker-port={low}", f"--max-worker-port={low + 999}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}"]

    nodes = {"head": Node("head", ["--head", f"--port={gcs}", "--num-cpus=2",
                                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                   *worker_ports()], env, root)}
    address = f"http://127.0.0.1:{dashboard}"
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    # Ray read its auth mode when it was imported (test collection): refresh it, as `ray start`
    # does for its own process (private API: ray is pinned)
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()

    def add(name: str) -> Node:
        nodes[name] = Node(name, [f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                  *worker_ports()], env, root)
        return nodes[name]

    def alive() -> dict[str, str]:
        """Node name -> node id of the nodes alive now."""
        out = {}
        for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")], limit=100,
                            raise_on_missing_output=False):
            name = next(r for r in n.resources_total if r in nodes)
            out[name] = n.node_id
        return out

    def wait_for(names: set[str], timeout_s: float = 120) -> dict[str, str]:
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                last = alive()
                if set(last) == names:
                    return last
            except Exception as exc:  # the dashboard is still starting
                last = repr(exc)
            time.sleep(1)
        logs = {n: (root / f"{n}.log").read_text()[-1000:] for n in nodes}
        pytest.fail(f"nodes {sorted(names)} not all alive in {timeout_s}s (last: {last}): {logs}")

    try:
        wait_for({"head"})
        add("worker_a"), add("worker_b")
        wait_for({"head", "worker_a", "worker_b"})
        _audit_catches_a_foreign_read(address, nodes)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env, "nodes": nodes,
               "add": add, "alive": alive, "wait_for": wait_for, "root": root}
    finally:
        for node in reversed(list(nodes.values())):
            node.cleanup()
        os.environ.clear()
        os.environ.update(saved)


def _audit_catches_a_foreign_read(address: str, nodes: dict[str, Node]) -> None:
    """The control for the audit: a task on worker_b that reads a file of the head's cache is
    recorded in worker_b's audit log (then the log is cleared for the real run)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    secret = nodes["head"].cache / "only-on-the-head.txt"
    secret.write_text("head")
    read = (f"import ray; ray.init(); f = ray.remote(resources={{'worker_b': 0.01}})"
            f"(lambda p: open(p).read()); assert ray.get(f.remote({str(secret)!r})) == 'head'")
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=f"{sys.executable} -c {shlex.quote(read)}")
    deadline = time.monotonic() + 120
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                             JobStatus.STOPPED):
        assert time.monotonic() < deadline, client.get_job_logs(job)
        time.sleep(1)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)
    log = nodes["worker_b"].audit_log
    assert log.is_file() and str(secret) in log.read_text(), "the node audit is not active"
    log.unlink()


def _pipeline_config(cluster: dict, bucket: str, http_port: int) -> dict:
    tiny = ["model.init=tiny", "model.max_query_length=16", "model.max_product_length=32"]
    return {
        "name": "mn",
        "storage": f"s3://{bucket}/cluster",
        "cluster": {"address": cluster["address"], "gcs_address": cluster["gcs"],
                    "start_local": False},
        "steps": [
            {"job": "data_jobs.prepare_catalog", "config": "configs/synthetic/prepare.yaml",
             "set": ["output_dir={storage}/data/{name}", "source.num_products=400",
                     "block_rows=200"]},
            {"job": "train_jobs.contrastive", "config": "configs/synthetic/stage1.yaml",
             "set": [*tiny, "data.prepared_dir={storage}/data/{name}", "data.hard_negatives=0",
                     "data.negatives_path=null", "optim.max_steps=80", "optim.batch_size=8",
                     "optim.warmup_steps=2", "optim.precision=fp32",
                     "scaling.cpus_per_worker=0.5",
                     "scaling.placement_strategy=STRICT_SPREAD",  # two workers, two nodes
                     "run.checkpoint_every=10", "run.log_every=10", "run.max_failures=3",
                     "run.name={name}-stage1", "run.storage_path={storage}/train",
                     "output_dir={storage}/models/{name}-stage1"]},
            {"job": "data_jobs.build_index", "config": "configs/synthetic/build_index.yaml",
             "set": ["prepared_dir={storage}/data/{name}",
                     "model={storage}/models/{name}-stage1",
                     "output_root={storage}/indexes/{name}", "embed.cpus_per_actor=0.25",
                     "embed.batch_size=64"]},
        ],
        "serve": {"index": "{storage}/indexes/{name}", "http_port": http_port,
                  "app_name": "retrieval", "config_path": str(cluster["root"] / "serve.yaml"),
                  "keep_serving": "no",
                  "args": {"write_key_file": str(cluster["root"] / "write_key"),
                           # each poll of the log is a GET on S3: 6 replicas, 20 a second
                           "log_poll_interval_s": 0.3, "writer_cpus": 0.1,
                           "shard_replicas": 2, "shard_cpus": 0.1, "ingress_cpus": 0.1,
                           "ingress_replicas": 2,
                           "lexical_cpus": 0.1, "lexical_replicas": 2,
                           "encoder": {"cpus": 0.2, "min_replicas": 2, "max_replicas": 2}}},
        "examples": ["red running shoes"],
    }


def _actors_by_node(cluster: dict, class_prefix: str) -> dict[str, list[str]]:
    """Live actors whose class starts with ``class_prefix``: node name -> class names."""
    from ray.util.state import list_actors

    node_name = {v: k for k, v in cluster["alive"]().items()}
    out: dict[str, list[str]] = {}
    for actor in list_actors(address=cluster["address"], filters=[("state", "=", "ALIVE")],
                             limit=1000, raise_on_missing_output=False):
        if actor.class_name.startswith(class_prefix) and actor.node_id in node_name:
            out.setdefault(node_name[actor.node_id], []).append(actor.class_name)
    return out


def test_pipeline_on_three_nodes_with_s3_storage_survives_losing_nodes(cluster, s3_server):
    from retrieval_platform import storage

    started = time.monotonic()
    node_ids = {name: node_id for name, node_id in cluster["alive"]().items()}
    http_port = free_port()
    config = _pipeline_config(cluster, s3_server["bucket"], http_port)
    (cluster["root"] / "write_key").write_text(WRITE_KEY)
    config_path = cluster["root"] / "pipeline.yaml"
    config_path.write_text("# retrieval-platform pipeline --config pipeline.yaml\n"
                           + yaml.safe_dump(config, sort_keys=False))
    checkpoints = f"{config['storage']}/train/mn-stage1"
    record: dict = {"nodes": {}, "faults": {}}

    # Stage 1 fault: once a checkpoint is in storage, kill a worker node that runs a training
    # worker; a fresh node joins, so that serving has three nodes again.
    def kill_a_training_node() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            listed = storage.list_files(checkpoints) if storage.exists(checkpoints) else {}
            if any(re.match(r"checkpoint_[^/]+/", f) for f in listed):
                break
            time.sleep(0.5)
        else:
            return
        workers = _actors_by_node(cluster, "RayTrainWorker")
        victim = next(n for n in ("worker_a", "worker_b") if n in workers)
        record["faults"]["stage1"] = {"training_workers_by_node": workers, "killed": victim,
                                      "checkpoints_then": sorted(
                                          {f.split("/")[0] for f in listed
                                           if f.startswith("checkpoint_")})}
        cluster["nodes"][victim].kill()
        cluster["add"]("worker_c")

    killer = threading.Thread(target=kill_a_training_node, daemon=True)
    killer.start()
    run = subprocess.run(
        [sys.executable, "-m", "retrieval_platform.cli", "pipeline", "--config",
         str(config_path)],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=1500)
    out = run.stdout + run.stderr
    (cluster["root"] / "pipeline.out").write_text(out)
    assert run.returncode == 0, out[-6000:]
    killer.join(timeout=5)
    assert "stage1" in record["faults"], "no checkpoint appeared in storage during stage 1"
    victim = record["faults"]["stage1"]["killed"]

    # Every job ran its own copy of the code (working_dir), on the head node; its artefacts
    # went to S3 and came back from there.
    ran = {m.group(1): json.loads(m.group(2))
           for m in re.finditer(r"(\w+) runs on (\{.*\})", out)}
    assert set(ran) == {"prepare_catalog", "train_contrastive", "build_index"}, out[-3000:]
    for where in ran.values():
        assert where["cwd"] != str(REPO) and where["code"].startswith(where["cwd"]), where
    resumed = re.findall(r"resumed from step (\d+) \(checkpoint (\S+)\)", out)
    assert resumed, out[-6000:]  # stage 1 restarted from its checkpoint in storage
    assert all(path.startswith(f"{s3_server['bucket']}/cluster/train/") for _, path in resumed)
    record["faults"]["stage1"]["resumed"] = sorted(set(resumed))
    listing = storage.list_files(config["storage"])
    for part in ("data/mn/manifest.json", "models/mn-stage1/_COMPLETE.json",
                 "indexes/mn/LATEST"):
        assert part in listing, sorted(listing)[:40]
    assert any(f.startswith("train/mn-stage1/checkpoint_") for f in listing)
    assert not (REPO / "runs" / "data" / "mn").exists()  # nothing landed in the checkout
    # the stage-1 model reached the nodes that embedded and served it through storage
    node_caches = {n: sorted(p.name for p in (node.cache / "storage").glob("*"))
                   for n, node in cluster["nodes"].items() if (node.cache / "storage").is_dir()}
    assert any(n != "head" and caches for n, caches in node_caches.items()), node_caches

    # Serving: two replicas of each shard, of the ingress, of the encoder and of BM25 on
    # different nodes; kill a node under dense and hybrid load (one with an ingress replica
    # where there is one; not the head, whose proxy takes the requests: with nodes of their
    # own addresses, proxy_location EveryNode and one URL per node cover that too). The
    # clients retry a search whose ingress replica died with it (serving/client.py).
    url = f"http://127.0.0.1:{http_port}"
    queries = ["red running shoes", "stainless steel kettle", "cotton bed sheets",
               "cordless drill", "silicone phone case", "wireless mouse"]
    modes = ["dense", "hybrid"]
    expected = {(q, m): _ids(httpx.post(f"{url}/search", json={"query": q, "k": 5, "mode": m},
                                        timeout=30))
                for q in queries for m in modes}
    replicas = _actors_by_node(cluster, "ServeReplica:retrieval")
    record["nodes"]["replicas_before"] = replicas
    shards = {c for cs in replicas.values() for c in cs if "Shard_" in c}
    candidates = sorted(
        (n for n, cs in replicas.items()
         if n != "head"
         # every replica on it has a twin elsewhere (the catalog writer is one by design and
         # takes no search)
         and all(any(c in others for m, others in replicas.items() if m != n)
                 for c in cs if "CatalogWriter" not in c)
         and any("Shard_" in c for c in cs)),
        key=lambda n: not any("Ingress" in c for c in replicas[n]))
    assert shards and candidates, replicas
    target = candidates[0]
    results: list[tuple[int, bool, bool]] = []  # status, partial, same answer
    clients = [SearchClient(url, timeout_s=30) for _ in range(4)]
    free = queue.SimpleQueue()
    for c in clients:
        free.put(c)

    def one(i: int) -> None:
        q, m = queries[i % len(queries)], modes[i // len(queries) % 2]
        client = free.get()
        try:
            body = client.search(q, 5, m)
            results.append((200, bool(body["partial"]),
                            [h["product_id"] for h in body["results"]] == expected[q, m]))
        except SearchError as exc:
            results.append((exc.status or 599, False, False))
        finally:
            free.put(client)

    n_requests = 300
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(n_requests)]
        while len(results) < n_requests // 4:
            time.sleep(0.05)
        cluster["nodes"][target].kill()
        killed_at = len(results)
        for f in futures:
            f.result()
    for c in clients:
        c.close()
    statuses = [s for s, _, _ in results]
    record["faults"]["serve"] = {
        "killed": target, "replicas_on_it": replicas[target], "after_request": killed_at,
        "retried": sum(c.retried for c in clients),
        "requests": len(results), "non_200": sum(s != 200 for s in statuses),
        "partial": sum(p for _, p, _ in results),
        "wrong": sum(s == 200 and not same for s, _, same in results)}
    # A pipeline re-run keeps the application serving while it builds a new index version,
    # then swaps it in place: no request fails meanwhile (the answers are the same: same model,
    # same catalog).
    version_before = httpx.get(f"{url}/healthz", timeout=30).json()["version"]
    rerun = dict(config, steps=config["steps"][-1:],
                 serve=dict(config["serve"], keep_serving="auto", cpus_needed=0.5))
    rerun_path = cluster["root"] / "rerun.yaml"
    rerun_path.write_text("# retrieval-platform pipeline --config rerun.yaml\n"
                          + yaml.safe_dump(rerun, sort_keys=False))
    during: list[tuple[int, bool, bool]] = []
    done = threading.Event()

    def keep_asking() -> None:
        i = 0
        while not done.is_set():
            q, m = queries[i % len(queries)], modes[i // len(queries) % 2]
            r = httpx.post(f"{url}/search", json={"query": q, "k": 5, "mode": m}, timeout=30)
            during.append((r.status_code, r.status_code == 200 and r.json()["partial"],
                           r.status_code == 200 and _ids(r) == expected[q, m]))
            i += 1
            time.sleep(0.05)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    second = subprocess.run(
        [sys.executable, "-m", "retrieval_platform.cli", "pipeline", "--config", str(rerun_path)],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=900)
    done.set()
    asker.join(timeout=60)
    second_out = second.stdout + second.stderr
    assert second.returncode == 0, second_out[-6000:]
    assert "keeps serving while the new version is built" in second_out, second_out[-3000:]
    version_after = httpx.get(f"{url}/healthz", timeout=30).json()["version"]
    record["faults"]["rerun"] = {
        "from": version_before, "to": version_after, "requests": len(during),
        "non_200": sum(s != 200 for s, _, _ in during), "partial": sum(p for _, p, _ in during),
        "wrong": sum(s == 200 and not same for s, _, same in during)}
    record["faults"]["writes"] = _write_stream_with_a_node_kill(cluster, url)
    record["nodes"]["alive_at_end"] = sorted(cluster["alive"]())
    record["jobs"] = ran
    node_ids |= {name: node_id for name, node_id in cluster["alive"]().items()}
    record["nodes"]["ids"] = node_ids
    record["storage"] = listing
    record["example_answer"] = re.findall(r"'red running shoes' \[dense.*?\n((?:\s+-?\d.*\n)+)",
                                          out)[:1]
    record["wall_seconds"] = round(time.monotonic() - started)
    record["stage1_victim"] = victim
    # No process of any node opened a file only another machine had (node_audit/).
    audits = {n: node.audit_log.read_text() for n, node in cluster["nodes"].items()
              if node.audit_log.is_file()}
    record["audit"] = {n: len(text.splitlines()) for n, text in audits.items()}
    if os.environ.get("RP_MULTINODE_REPORT"):
        Path(os.environ["RP_MULTINODE_REPORT"]).write_text(json.dumps(record, indent=1))
        (Path(os.environ["RP_MULTINODE_REPORT"]).with_suffix(".log")).write_text(out)
    assert not audits, audits
    for fault in ("serve", "rerun"):
        counts = record["faults"][fault]
        assert counts["non_200"] == counts["partial"] == counts["wrong"] == 0, record
    writes = record["faults"]["writes"]
    assert writes["acknowledged"] >= 40 and writes["lost"] == [] and writes["killed"], record
    assert version_after != version_before and during, record


def _write_stream_with_a_node_kill(cluster: dict, url: str) -> dict:
    """New products and price patches written while a node with serving replicas (the
    writer's, if it is not on the head) is killed: a write answered 503 is retried (it was not
    acknowledged); afterwards every acknowledged one is served, with its last price, by the
    replicas the cluster has then (replayed from the log in S3)."""
    alive = set(cluster["alive"]())
    cluster["add"]("worker_d")
    cluster["wait_for"](alive | {"worker_d"})
    headers = {"X-Write-Key": WRITE_KEY}
    acked: dict[str, tuple[int, float]] = {}  # product -> (seq, price)
    retried, killed = 0, []

    def write(client: httpx.Client, method: str, path: str, body: dict) -> dict:
        nonlocal retried
        deadline = time.monotonic() + 120
        while True:
            r = client.request(method, path, json=body, headers=headers)
            if r.status_code in (200, 201):
                return r.json()
            # not acknowledged (a replica on the dead node): the client retries
            assert r.status_code >= 500 and time.monotonic() < deadline, r.text
            retried += 1
            time.sleep(0.5)

    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(60):
            if i == 20:
                replicas = _actors_by_node(cluster, "ServeReplica:retrieval")
                writer_on = [n for n, cs in replicas.items() if any("CatalogWriter" in c
                                                                    for c in cs)]
                # the writer's node, else one with shard replicas (the ingress's too, if it
                # is there: the writes it was carrying are retried)
                victims = [n for n in writer_on if n != "head"] or [
                    n for n, cs in replicas.items() if n != "head"
                    and any("Shard_" in c for c in cs)]
                if victims:
                    cluster["nodes"][victims[0]].kill()
                    killed.append({"node": victims[0], "replicas": replicas[victims[0]]})
            pid = f"mnw-{i}"
            body = {"title": f"qx{i} gadget", "category": "Live", "price": float(i)}
            seq = write(client, "PUT", f"/products/{pid}", body)["seq"]
            acked[pid] = (seq, float(i))
            if i % 3 == 2:  # a price patch of an earlier one
                earlier = f"mnw-{i - 2}"
                seq = write(client, "PATCH", f"/products/{earlier}",
                            {"price": 1000.0 + i})["seq"]
                acked[earlier] = (seq, 1000.0 + i)
        last = max(seq for seq, _ in acked.values())
        deadline = time.monotonic() + 180
        while client.post("/search", json={"query": "qx1", "k": 1, "mode": "lexical"}
                          ).json()["applied_position"] < last:
            assert time.monotonic() < deadline, "the log was not applied"
            time.sleep(0.2)
        lost = []
        for pid, (_, price) in acked.items():
            n = pid.split("-")[1]
            hits = client.post("/search", json={"query": f"qx{n}", "k": 5,
                                                "mode": "lexical"}).json()["results"]
            mine = [h for h in hits if h["product_id"] == pid]
            if len(mine) != 1 or mine[0]["price"] != price:
                lost.append(pid)
    return {"acknowledged": len(acked), "retried_5xx": retried, "killed": killed,
            "last_seq": last, "lost": lost}


def _ids(response: httpx.Response) -> list[str]:
    response.raise_for_status()
    return [h["product_id"] for h in response.json()["results"]]
