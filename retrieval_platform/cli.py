"""``retrieval-platform``: the end-to-end pipeline, search, version swaps, status and stop.

    retrieval-platform pipeline --config configs/synthetic/pipeline.yaml
    retrieval-platform search "cordless drill" [--k 10] [--mode hybrid] [--url URL] [--json]
    retrieval-platform swap --index runs/indexes/synthetic/v20261124-101500
    retrieval-platform experiment start --name e1 --arm control=INDEX:90 --arm new=INDEX:10
    retrieval-platform experiment ramp --weight new=50 | stop [--arm new] | promote --arm new
    retrieval-platform status
    retrieval-platform stop
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Clusters we start use token authentication (Ray >= 2.59; the pipeline generates
# ~/.ray/auth_token before `ray start`); Ray's clients send the token only in token mode, which
# must be set before Ray is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from retrieval_platform.config import ConfigError, load_config
from retrieval_platform.errors import PlatformError
from retrieval_platform.jobs import configure_logging


def _pipeline(args: argparse.Namespace) -> int:
    from retrieval_platform.pipeline import PipelineConfig, print_summary, run_pipeline

    home = Path.cwd()
    cfg = load_config(PipelineConfig, args.config,
                      args.overrides + (["smoke=true"] if args.smoke else []))
    if args.name:
        cfg.name = args.name
    for step in cfg.steps:  # the data options reach the preparation step
        if step.job.endswith("prepare_catalog"):
            if args.data_format:
                step.set.append(f"source.format={args.data_format}")
            if args.data_path:
                step.set.append(f"source.path={Path(args.data_path).absolute()}")
    out = run_pipeline(cfg, home)
    print_summary(cfg, home, out)
    return 0


def _swap(args: argparse.Namespace) -> int:
    import ray

    from retrieval_platform.serving.control import swap_version

    ray.init(address=args.address, logging_level=logging.WARNING, configure_logging=False)
    from retrieval_platform.storage import canonical

    print(json.dumps(swap_version(canonical(args.index), app_name=args.app), indent=2))
    return 0


def _arm_spec(text: str) -> dict:
    """``NAME=INDEX:WEIGHT`` (the index may hold colons: a URI; the weight is after the last)."""
    name, sep, rest = text.partition("=")
    index, colon, weight = rest.rpartition(":")
    if not (sep and colon and name and index):
        raise PlatformError(f"--arm {text!r}: expected NAME=INDEX:WEIGHT")
    try:
        return {"name": name, "index": index, "weight": float(weight)}
    except ValueError:
        raise PlatformError(f"--arm {text!r}: the weight {weight!r} is not a number") from None


def _weight_spec(text: str) -> tuple[str, float]:
    name, sep, weight = text.partition("=")
    try:
        return name, float(weight) if sep else float("nan")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=WEIGHT") from None


def _experiment(args: argparse.Namespace) -> int:
    """Start, ramp, stop or promote, in place on the running application."""
    import ray

    from retrieval_platform.experiments import control
    from retrieval_platform.serving.app import ExperimentArgs
    from retrieval_platform.storage import canonical

    # the arguments first: a mistake costs no connection to the cluster
    if args.action != "start" and len(args.arms) > 1:
        raise PlatformError(f"experiment {args.action} takes one --arm NAME")
    arm = args.arms[0] if args.arms else None
    if args.action == "start" and (not args.name or not args.arms):
        raise PlatformError("experiment start needs --name and at least one --arm")
    if args.action == "ramp" and not args.weights:
        raise PlatformError("experiment ramp needs --weight NAME=WEIGHT")
    if args.action == "promote" and not arm:
        raise PlatformError("experiment promote needs --arm NAME")
    arms = [spec | {"index": canonical(spec["index"])}
            for spec in map(_arm_spec, args.arms)] if args.action == "start" else []
    ray.init(address=args.address, logging_level=logging.WARNING, configure_logging=False)
    common = {"app_name": args.app, "save_config": args.save_config}
    if args.action == "start":
        out = control.start(ExperimentArgs(name=args.name, method=args.method, arms=arms),
                            **common)
    elif args.action == "ramp":
        out = control.ramp(dict(args.weights), **common)
    elif args.action == "stop":
        out = control.stop(arm, **common)
    else:
        out = control.promote(arm, **common)
    print(json.dumps(out, indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    """One query against a running endpoint (the HTTP API: what any client sends), retried on
    another of the ``--url``s if a replica or proxy is lost (serving/client.py)."""
    from retrieval_platform.serving.client import SearchClient

    fields: dict = {}
    filters = {k: v for k, v in (("category", args.category), ("price_min", args.price_min),
                                 ("price_max", args.price_max)) if v is not None}
    if filters:
        fields["filters"] = filters
    given = args.url or [os.environ.get("RP_URL", "http://127.0.0.1:8000")]
    urls = [u for arg in given for u in arg.split(",") if u]
    with SearchClient(urls, api_key=os.environ.get(args.api_key_env) or None,
                      timeout_s=args.timeout) as client:
        data = client.search(args.query, args.k, args.mode, **fields)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{len(data['results'])} results ({data['mode']}, index {data['version']}, "
          f"model {data['model_id']}{', PARTIAL' if data.get('partial') else ''})")
    for rank, hit in enumerate(data["results"], 1):
        price = f"  ${hit['price']:.2f}" if hit.get("price") is not None else ""
        print(f"{rank:>3}. {hit['score']:.4f}  {hit['product_id']}  {hit['title']}{price}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from retrieval_platform.cluster import connect

    connect(args.dashboard)  # a one-line answer when no cluster runs, or it refuses us
    ray_bin = str(Path(sys.executable).with_name("ray"))
    serve_bin = str(Path(sys.executable).with_name("serve"))
    subprocess.run([ray_bin, "status"], check=False)
    subprocess.run([serve_bin, "status", "--address", args.dashboard], check=False)
    return 0


def _storage(args: argparse.Namespace) -> int:
    """Copy a local folder (a model of your own, say) to a storage location, or list one."""
    from retrieval_platform import storage

    if args.action == "upload":
        if not args.local or not Path(args.local).is_dir():
            raise PlatformError(f"upload: {args.local!r} is not a local folder")
        with storage.publish(args.location, overwrite=args.overwrite) as tmp:
            shutil.copytree(args.local, tmp, dirs_exist_ok=True)
        print(f"{args.local} -> {storage.canonical(args.location)}")
        return 0
    for name, size in storage.list_files(args.location).items():
        print(f"{size:>12,}  {name}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    """Stop Serve, every job and the local cluster this machine started."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray_bin, "stop"], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval-platform", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="prepare, train both stages, evaluate, index, serve")
    p.add_argument("--config", default="configs/synthetic/pipeline.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", help="namespace of every output (runs/*/NAME)")
    p.add_argument("--data-format", help="source format for the preparation step "
                                         "(synthetic, homedepot, esci, wands, canonical)")
    p.add_argument("--data-path", help="source folder for the preparation step")
    p.add_argument("--smoke", action="store_true",
                   help="every step at smoke size (the steps' `smoke` overrides), under NAME-smoke")
    p.set_defaults(func=_pipeline)
    q = sub.add_parser("search", help="send one query to a running endpoint")
    q.add_argument("query")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default="dense")
    q.add_argument("--category")
    q.add_argument("--price-min", type=float)
    q.add_argument("--price-max", type=float)
    q.add_argument("--url", action="append",
                   help="the endpoint; repeat it (or give a comma-separated list) for one URL "
                        "per node's proxy: a lost one is retried on the next (default: $RP_URL "
                        "or http://127.0.0.1:8000)")
    q.add_argument("--api-key-env", default="RP_API_KEY",
                   help="environment variable holding the API key, if the app requires one")
    q.add_argument("--timeout", type=float, default=30.0)
    q.add_argument("--json", action="store_true", help="print the raw JSON answer")
    q.set_defaults(func=_search)
    s = sub.add_parser("swap", help="serve another index version without dropping requests")
    s.add_argument("--index", required=True, help="the new index version folder")
    s.add_argument("--app", default="retrieval")
    s.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    s.set_defaults(func=_swap)
    e = sub.add_parser("experiment", help="run an online experiment on the running endpoint: "
                                          "start, ramp, stop, promote (in place, no downtime)")
    e.add_argument("action", choices=["start", "ramp", "stop", "promote"])
    e.add_argument("--name", help="start: the experiment's name (it salts the assignment)")
    e.add_argument("--arm", dest="arms", action="append", default=[],
                   metavar="ARM", help="start: NAME=INDEX:WEIGHT, an arm (repeatable); stop: "
                   "the arm to stop (none: the whole experiment); promote: the winner")
    e.add_argument("--method", choices=["ab", "interleave"], default="ab")
    e.add_argument("--weight", dest="weights", action="append", type=_weight_spec, default=[],
                   metavar="NAME=WEIGHT", help="ramp: an arm's new weight (repeatable)")
    e.add_argument("--app", default="retrieval")
    e.add_argument("--save-config", help="write the resulting Serve config here (serve deploy "
                                         "of it gives the same state)")
    e.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"))
    e.set_defaults(func=_experiment)
    st = sub.add_parser("status", help="the cluster's resources and the Serve applications")
    st.add_argument("--dashboard", default="http://127.0.0.1:8265")
    st.set_defaults(func=_status)
    sub.add_parser("stop", help="stop Serve and the local Ray cluster").set_defaults(func=_stop)
    sg = sub.add_parser("storage", help="list a storage location, or upload a local folder to it "
                                        "(checksummed, as jobs publish)")
    sg.add_argument("action", choices=["ls", "upload"])
    sg.add_argument("location", help="a folder or URI (s3://bucket/prefix/...)")
    sg.add_argument("local", nargs="?", help="upload: the local folder")
    sg.add_argument("--overwrite", action="store_true")
    sg.set_defaults(func=_storage)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        return args.func(args)
    except (PlatformError, ConfigError) as exc:
        print(f"retrieval-platform {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
