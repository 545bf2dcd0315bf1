"""The evaluation report: ``report.json`` (every number, per query too), ``report.md`` (the
table), ``report.png`` (the metrics per system) and ``training.png`` (the training curves of the
evaluated models that training wrote)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_platform.io import write_json

METRIC_COLUMNS = ["ndcg@10", "recall@10", "recall@100", "map@10", "mrr@10",
                  "grade_order_accuracy", "grade_order_accuracy_gap"]


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    curves = training_curves(report)
    if curves:
        plot_training(curves, out / "training.png")
    (out / "report.md").write_text(render_markdown(report, curves))
    plot(report, out / "report.png")


def training_curves(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each evaluated model that training wrote: its stage, run and per-step history."""
    out = {}
    for name, model in report.get("models", {}).items():
        record = Path(model["path"]) / "training.json"
        if record.is_file():
            training = json.loads(record.read_text())
            out[name] = {"stage": training["stage"], "run": training["config"]["run"]["name"],
                         "history": training.get("history", [])}
    return out


def plot_training(curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Training loss and in-batch accuracy over steps, one line per evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, curve in curves.items():
        steps = [h["step"] for h in curve["history"]]
        label = f"{name} ({curve['stage']}, run {curve['run']})"
        for ax, key in zip(axes, ("loss", "in_batch_accuracy"), strict=True):
            ax.plot(steps, [h.get(key, float("nan")) for h in curve["history"]], label=label)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
    axes[0].set_title("training loss")
    axes[1].set_title("in-batch accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(report: dict[str, Any], curves: dict[str, dict[str, Any]] | None = None
                    ) -> str:
    results = report["results"]
    base = results.get("bm25", {}).get("ndcg@10")
    lines = [
        f"# Evaluation: {Path(report['dataset']).name}, split {report['split']}",
        "",
        f"{'Full-corpus' if report.get('full_corpus', True) else 'Sampled-corpus'} retrieval "
        f"over {report['products']} products, {report['queries']} queries. "
        f"Gain map: {report['gain_map']}. Recall and MRR count {report['top_grade']} as "
        "top grade. Grade-order accuracy: share of judged pairs with different grades that the "
        "system scores in the right order (_gap: pairs at least 1 grade apart).",
        "",
        "| system | " + " | ".join(METRIC_COLUMNS) + " | NDCG@10 / BM25 | seconds |",
        "|---|" + "---:|" * (len(METRIC_COLUMNS) + 2),
    ]
    for name, m in results.items():
        ratio = f"{m['ndcg@10'] / base:.3f}" if base else "–"
        cells = " | ".join(f"{m.get(c, float('nan')):.4f}" for c in METRIC_COLUMNS)
        lines.append(f"| {name} | {cells} | {ratio} | {m['seconds']} |")
    if report.get("reranked"):
        lines += reranked_section(report)
    if report.get("models"):
        lines += ["", "Models:", ""]
        lines += [f"- {n}: `{v['model_id']}` ({v['path']})" for n, v in report["models"].items()]
    if curves:
        lines += ["", "Training runs compared (curves: training.png):", ""]
        lines += [f"- {n}: {c['stage']}, run `{c['run']}`, {len(c['history'])} logged steps"
                  for n, c in curves.items()]
    return "\n".join(lines) + "\n"


def reranked_section(report: dict[str, Any]) -> list[str]:
    """Each reranked system against its first stage: NDCG@10 and recall@10 differences with
    95 % paired bootstrap intervals over queries, and NDCG@10 by query length."""
    from retrieval_platform.stats import length_stratum, paired_bootstrap

    pq, texts = report["per_query"], report["query_text"]
    strata = sorted({length_stratum(t) for t in texts.values()})
    by_stratum = {s: [q for q, t in texts.items() if length_stratum(t) == s] for s in strata}
    lines = ["", f"Reranked by `{report['reranker'].get('model_id', '')}`: Δ = reranked − its "
             "first stage, 95 % paired bootstrap interval over queries (2,000 resamples).", "",
             "| system | first stage | Δ NDCG@10 | Δ recall@10 | "
             + " | ".join(f"NDCG@10 {s} words (n={len(by_stratum[s])})" for s in strata)
             + " |", "|---|---|---:|---:|" + "---:|" * len(strata)]
    for name, what in report["reranked"].items():
        base = what["base"]
        cells = [str(paired_bootstrap(pq[base], pq[name], m)) for m in ("ndcg@10", "recall@10")]
        for s in strata:
            mean = [float(np.nanmean([pq[n][q]["ndcg@10"] for q in by_stratum[s]]))
                    for n in (base, name)]
            cells.append(f"{mean[0]:.4f} → {mean[1]:.4f}")
        lines.append(f"| {name} | {base} | " + " | ".join(cells) + " |")
    if report.get("reranker"):
        lines += ["", f"Reranker: `{report['reranker']['model_id']}` "
                      f"({report['reranker']['path']})"]
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ranking = [c for c in METRIC_COLUMNS if not c.startswith("grade_order")]
    width = 0.8 / max(1, len(names))
    x = np.arange(len(ranking))
    for i, name in enumerate(names):
        axes[0].bar(x + i * width, [results[name][c] for c in ranking], width, label=name)
    axes[0].set_xticks(x + width * (len(names) - 1) / 2, ranking)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("Full-corpus retrieval")
    axes[0].legend(fontsize=8)
    axes[1].bar(range(len(names)), [results[n]["grade_order_accuracy"] for n in names],
                color=[f"C{i}" for i in range(len(names))])
    axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[1].set_ylim(0.4, 1)
    axes[1].set_title("Grade-order accuracy")
    fig.suptitle(f"{Path(report['dataset']).name} / {report['split']}: "
                 f"{report['queries']} queries, {report['products']} products")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
