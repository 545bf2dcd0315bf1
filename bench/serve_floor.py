"""The floor of the HTTP path on this machine: what Ray Serve costs with no search at all, so
the serving numbers (``serve_open_loop.py``) can be split into the platform's work and the
box's. One run measures, in turn:

- a plain Ray actor call (``ray.get(actor.ping.remote())``), one at a time;
- the same FastAPI no-op under plain uvicorn, no Ray (the load generator's own ceiling);
- ``/noop``: proxy -> a FastAPI ingress that answers at once;
- ``/hop``: the same plus one deployment-handle call to a second deployment (what each of the
  platform's hops, ingress -> encoder and ingress -> shard, costs at least);
- both under open-loop constant-rate load (``_load.open_loop``) at each offered rate;
- with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the environment (Ray's throughput-optimised
  mode: the ingress replica runs its own HTTP server, port 30000), both paths again on the
  replica's port, without the proxy.

    python bench/serve_floor.py [--rates 25 50 100 150 200] [--duration 8] [--json out.json]

The load generator runs on the same machine (it takes CPU from the service: say so beside the
numbers). Loopback only, bounded runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ray
from _load import open_loop
from _setup import direct_ingress_url, local_ray
from fastapi import FastAPI
from ray import serve

floor_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Leaf:
    def ping(self, x: int) -> int:
        return x


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(floor_api)
class Front:
    def __init__(self, leaf: object) -> None:
        self.leaf = leaf

    @floor_api.post("/noop")
    async def noop(self, body: dict) -> dict:
        return {"ok": True}

    @floor_api.post("/hop")
    async def hop(self, body: dict) -> dict:
        lap = time.perf_counter()
        await self.leaf.ping.remote(1)
        return {"hop_ms": (time.perf_counter() - lap) * 1000}


@ray.remote(num_cpus=0.1)
class Pinged:
    def ping(self, x: int) -> int:
        return x


def deploy(port: int) -> str:
    """A local Ray serving ``Front`` -> ``Leaf`` behind the proxy on ``port``; its URL."""
    local_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Front.bind(Leaf.bind()), name="floor", route_prefix="/")
    time.sleep(3.0)  # a direct-ingress replica's own server starts after the deployment is up
    return f"http://127.0.0.1:{port}"


def one_at_a_time(url: str, path: str, n: int = 60) -> dict[str, float]:
    """Median client latency (and the ingress's own hop time) of requests sent one by one."""
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post(path, json={"i": -1})
        client_ms, hop_ms = [], []
        for i in range(n):
            lap = time.perf_counter()
            answer = client.post(path, json={"i": i}).json()
            client_ms.append((time.perf_counter() - lap) * 1000)
            hop_ms.append(answer.get("hop_ms", 0.0))
    return {"client_p50_ms": round(statistics.median(client_ms), 1),
            "handle_hop_p50_ms": round(statistics.median(hop_ms), 1)}


PLAIN_SERVER = """
import sys
import uvicorn
from fastapi import FastAPI
api = FastAPI()
@api.post("/noop")
async def noop(body: dict) -> dict:
    return {"ok": True}
uvicorn.run(api, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def plain_uvicorn(port: int) -> subprocess.Popen:
    """The no-op endpoint in a plain uvicorn process (no Ray), answering once it is up."""
    server = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(port)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/noop", json={}, timeout=2)
            return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("plain uvicorn did not start")


def actor_call_ms(n: int = 200) -> float:
    actor = Pinged.remote()
    ray.get(actor.ping.remote(0))
    times = []
    for i in range(n):
        lap = time.perf_counter()
        ray.get(actor.ping.remote(i))
        times.append((time.perf_counter() - lap) * 1000)
    ray.kill(actor)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[25, 50, 100, 150, 200])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=8015)
    parser.add_argument("--json")
    args = parser.parse_args()
    urls = {"plain uvicorn": f"http://127.0.0.1:{args.port + 1}", "proxy": deploy(args.port)}
    if direct := direct_ingress_url():
        urls["direct ingress"] = direct
    out: dict = {"cpus": os.cpu_count(), "duration_s": args.duration,
                 "worker_niceness": os.environ.get("RAY_worker_niceness", "15"),  # noqa: SIM112 (Ray's name)
                 "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0"),
                 "actor_call_p50_ms": actor_call_ms(), "paths": {}}
    print("plain actor call p50 ms", out["actor_call_p50_ms"], flush=True)
    baseline = plain_uvicorn(args.port + 1)
    for via, url in urls.items():
        for path in ("/noop",) if via == "plain uvicorn" else ("/noop", "/hop"):
            row = {"idle": one_at_a_time(url, path), "runs": {}}
            print(via, path, "idle", row["idle"], flush=True)
            for rate in args.rates:
                time.sleep(2.0)
                run = asyncio.run(open_loop(url, lambda i, path=path: ("POST", path, {"i": i}),
                                            rate, args.duration, grace_s=args.grace)).summary()
                row["runs"][f"{rate:g}"] = run
                print(via, path, rate, run, flush=True)
            out["paths"][f"{via} {path}"] = row
        if via == "plain uvicorn":
            baseline.kill()
    serve.shutdown()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
