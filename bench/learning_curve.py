"""A training run's learning curve: dev NDCG@10 of each kept checkpoint on a fixed sample of
queries over a sampled corpus (the same sample at every point), with the training loss.

    python bench/learning_curve.py --run runs/train/homedepot-smollm2-stage1
        [--prepared runs/data/homedepot] [--queries 200] [--products 3000]
        [--start smollm2-135m] [--reference minilm-l6 ...] [--out runs/curves/NAME]

``--start`` is the run's starting model (step 0); ``--reference`` models are drawn as flat
lines. Writes curve.json, curve.png and the evaluation report (per-query values for paired
intervals) under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _setup import local_ray

from retrieval_platform.config import from_dict
from retrieval_platform.encoder.model import model_info
from retrieval_platform.evaluation.run import EvaluateConfig, evaluate
from retrieval_platform.training.checkpoint import HISTORY_FILE, MODEL_DIR


def checkpoints(run: Path) -> dict[int, Path]:
    """step -> model folder of every checkpoint kept in a run's storage folder."""
    out = {}
    for folder in sorted(run.glob("checkpoint_*")):
        model = folder / MODEL_DIR
        if (model / "config.json").is_file():
            out[int(model_info(model)["metadata"]["step"])] = model
    return dict(sorted(out.items()))


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [p["step"] for p in curve["points"]]
    ax.plot(steps, [p["ndcg@10"] for p in curve["points"]], "o-", label=curve["run"])
    for i, (name, value) in enumerate(curve["references"].items()):
        ax.axhline(value, ls="--", color=f"C{i + 1}", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"dev sample: {curve['queries']} queries, {curve['products']} products")
    ax.legend(fontsize=8)
    history = curve["history"]
    if history:
        ax_loss.plot([h["step"] for h in history], [h["loss"] for h in history])
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the run's storage folder")
    parser.add_argument("--prepared", default="runs/data/homedepot")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--products", type=int, default=3000)
    parser.add_argument("--start", help="the starting model, plotted at step 0")
    parser.add_argument("--reference", nargs="*", default=[])
    parser.add_argument("--out")
    args = parser.parse_args()

    run = Path(args.run)
    out = Path(args.out or f"runs/curves/{run.name}")
    points = checkpoints(run)
    models = {f"step_{s}": str(m) for s, m in points.items()}
    if args.start:
        models = {"step_0": args.start} | models
    models |= {f"ref:{Path(r).name}": r for r in args.reference}
    local_ray()
    report = evaluate(from_dict(EvaluateConfig, {
        "prepared_dir": args.prepared, "split": "dev", "models": models, "bm25": True,
        "max_queries": args.queries, "max_products": args.products,
        "output_dir": str(out / "report"),
        "embed": {"actors": 2, "cpus_per_actor": 0.9, "precision": "auto",
                  "encode_batch_size": 64}}))
    results = report["results"]
    last = points[max(points)].parent / HISTORY_FILE if points else None
    curve = {
        "run": run.name, "queries": report["queries"], "products": report["products"],
        "points": [{"step": int(n.removeprefix("step_")), "ndcg@10": results[n]["ndcg@10"],
                    "recall@100": results[n]["recall@100"]}
                   for n in models if n.startswith("step_")],
        "references": {n.removeprefix("ref:"): results[n]["ndcg@10"]
                       for n in [*[m for m in models if m.startswith("ref:")], "bm25"]},
        "history": json.loads(last.read_text()) if last and last.is_file() else [],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    plot(curve, out / "curve.png")
    print("| step | NDCG@10 | Recall@100 |\n|---:|---:|---:|")
    for p in curve["points"]:
        print(f"| {p['step']} | {p['ndcg@10']:.4f} | {p['recall@100']:.4f} |")
    for name, value in curve["references"].items():
        print(f"| {name} | {value:.4f} | |")


if __name__ == "__main__":
    main()
