"""The method's ablation (the paper's Table 1) on one split, one change a row, cumulative, each
difference with a 95 % paired bootstrap interval over queries.

    python bench/ablation.py --config configs/homedepot/ablation.yaml [--only ARM ...] [--summary]

Every arm trains from its ``init`` (a backbone or an earlier arm's model) with the base config
of its stage plus its overrides, on the real Ray Train path (``training.trainer.train``), and is
evaluated on the corpus the ``evaluate`` settings say (``evaluation.evaluate``; the full one
unless ``max_products``). An arm whose report exists is skipped, and one whose model exists is
only evaluated, so a rerun continues where the last one stopped; ``--summary`` only rewrites
the tables. Kind ``model`` evaluates a model folder as it is (another ablation's arm, on
another corpus). With ``noise_band`` (two arms that differ only in their seed), every
difference is also judged against the seed band: it counts only when its interval excludes 0
and its Δ lies outside the band's interval. Writes ``OUTPUT/ablation.md`` (tables),
``ablation.json`` and ``curves.png`` (training loss per arm).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from retrieval_platform.config import apply_overrides, from_dict, load_config, load_yaml, to_dict
from retrieval_platform.evaluation.run import EvaluateConfig, evaluate
from retrieval_platform.jobs import configure_logging, ray_session
from retrieval_platform.stats import Difference, length_stratum, paired_bootstrap
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.mining import MineConfig, mine_negatives
from retrieval_platform.training.trainer import train

log = logging.getLogger("ablation")
METRICS = ["ndcg@10", "recall@100", "map@10", "mrr@10", "grade_order_accuracy",
           "grade_order_accuracy_gap"]
# what stage 2 targets (metrics.stage2_pairs): reported where the evaluation has grade bins
STAGE2_METRICS = ["bin_order_accuracy", "mid_low_accuracy", "top_grade_auc"]


@dataclass
class Arm:
    name: str
    kind: Literal["zero_shot", "model", "stage1", "stage2"] = "stage1"
    init: str = "minilm-l6"  # a backbone name, a model folder (kind model) or an earlier arm
    set: list[str] = field(default_factory=list)  # dotted overrides of the stage's base config
    negatives_from: str | None = None  # mine negatives with this arm's model first
    compare: list[str] = field(default_factory=list)  # arms to diff against (default: row above)
    hybrid: bool = False  # also evaluate BM25 and the RRF hybrid of this arm's model


@dataclass
class AblationConfig:
    prepared_dir: str = "runs/data/homedepot"
    split: str = "dev"
    stage1: str = "configs/homedepot/stage1_minilm.yaml"
    stage2: str = "configs/homedepot/stage2_minilm.yaml"
    mine: str = "configs/homedepot/mine_negatives.yaml"
    evaluate: dict[str, Any] = field(default_factory=dict)  # EvaluateConfig fields
    output_dir: str = "runs/ablation/homedepot"
    arms: list[Arm] = field(default_factory=list)
    # two arms that differ only in run.seed (data order, dropout): the seed band
    noise_band: list[str] = field(default_factory=list)


CONFIG = AblationConfig


def validate(cfg: AblationConfig) -> None:
    """Every arm an arm refers to comes before it; stage 2 starts from a trained arm; every
    arm's overrides load into its stage's config (a typo fails now, not hours in)."""
    seen: dict[str, Arm] = {}
    for arm in cfg.arms:
        for ref in [arm.negatives_from, *arm.compare]:
            if ref is not None and ref not in seen:
                raise ValueError(f"arm {arm.name}: {ref!r} is not an earlier arm")
        if arm.kind == "stage2" and seen.get(arm.init, Arm("", "zero_shot")).kind == "zero_shot":
            raise ValueError(f"arm {arm.name}: stage 2 starts from a trained arm, not {arm.init}")
        if arm.kind in ("stage1", "stage2"):
            load_config(TrainConfig, cfg.stage1 if arm.kind == "stage1" else cfg.stage2, arm.set)
        seen[arm.name] = arm
    if cfg.noise_band and (len(cfg.noise_band) != 2 or not set(cfg.noise_band) <= set(seen)):
        raise ValueError(f"noise_band {cfg.noise_band}: two of the arms")


def model_of(cfg: AblationConfig, arm: str) -> str:
    return str(Path(cfg.output_dir) / "models" / arm)


def run_arm(cfg: AblationConfig, arm: Arm, arms: dict[str, Arm]) -> None:
    out = Path(cfg.output_dir)
    report_path = out / "eval" / arm.name / "report.json"
    if report_path.is_file():
        log.info("%s: done before, skipped", arm.name)
        return
    started = time.perf_counter()
    model = arm.init if arm.init not in arms else model_of(cfg, arm.init)
    timing: dict[str, float] = {}
    trained = (Path(model_of(cfg, arm.name)) / "training.json").is_file()
    if arm.kind in ("stage1", "stage2") and trained:
        log.info("%s: model trained before, evaluated only", arm.name)
        model = model_of(cfg, arm.name)
    elif arm.kind in ("stage1", "stage2"):
        overrides = [f"data.prepared_dir={cfg.prepared_dir}", f"model.init={model}",
                     f"run.name=ablation-{arm.name}", f"output_dir={model_of(cfg, arm.name)}",
                     f"run.storage_path={out / 'train'}"]
        if arm.negatives_from:
            negatives = out / "negatives" / f"{arm.negatives_from}.parquet"
            if not negatives.is_file():
                t = time.perf_counter()
                miner = arms[arm.negatives_from]
                source = (miner.init if miner.kind in ("zero_shot", "model")
                          else model_of(cfg, miner.name))
                mine_negatives(load_config(MineConfig, cfg.mine, [
                    f"prepared_dir={cfg.prepared_dir}", f"model={source}",
                    f"output_path={negatives}"]))
                timing["mining_s"] = round(time.perf_counter() - t, 1)
            overrides.append(f"data.negatives_path={negatives}")
        base = cfg.stage1 if arm.kind == "stage1" else cfg.stage2
        train_cfg = load_config(TrainConfig, base, [*overrides, *arm.set])
        t = time.perf_counter()
        train(train_cfg)
        timing["train_s"] = round(time.perf_counter() - t, 1)
        model = model_of(cfg, arm.name)
    eval_cfg = from_dict(EvaluateConfig, apply_overrides(dict(cfg.evaluate), [
        f"prepared_dir={cfg.prepared_dir}", f"split={cfg.split}",
        f"output_dir={report_path.parent}"]) | {
        "models": {arm.name: model}, "bm25": arm.hybrid,
        "hybrid": [arm.name] if arm.hybrid else []})
    t = time.perf_counter()
    report = evaluate(eval_cfg)
    timing["eval_s"] = round(time.perf_counter() - t, 1)
    report["arm"] = to_dict(arm) | {"timing": timing,
                                    "wall_s": round(time.perf_counter() - started, 1)}
    report_path.write_text(json.dumps(report))
    log.info("%s: %s (%s)", arm.name, report["results"], timing)


def _systems(cfg: AblationConfig) -> dict[str, dict[str, Any]]:
    """Every evaluated system (arms, and BM25 / hybrid where an arm ran them) -> its report."""
    out = {}
    for arm in cfg.arms:
        path = Path(cfg.output_dir) / "eval" / arm.name / "report.json"
        if path.is_file():
            report = json.loads(path.read_text())
            for system in report["results"]:
                out[system] = {"report": report, "system": system}
    return out


def detectable(band: Difference) -> float:
    """The smallest effect a design with this seed band detects: the band interval's larger
    end in absolute value (what two runs that differ only in their seed can show)."""
    return max(abs(band.low), abs(band.high))


def beyond_band(found: Difference, band: Difference) -> bool:
    """A difference counts when its own interval excludes 0 and it exceeds the seed band."""
    excludes_zero = found.low > 0 or found.high < 0
    return excludes_zero and abs(found.delta) > detectable(band)


def summarize(cfg: AblationConfig) -> str:
    systems = _systems(cfg)
    if not systems:
        return "no arm has a report yet"
    arms = {a.name: a for a in cfg.arms}
    pq = {n: s["report"]["per_query"][s["system"]] for n, s in systems.items()}
    metrics = METRICS + [m for m in STAGE2_METRICS
                         if all(m in s["report"]["results"][s["system"]] for s in systems.values())]
    band = ({k: paired_bootstrap(pq[cfg.noise_band[0]], pq[cfg.noise_band[1]], k)
             for k in metrics} if len(cfg.noise_band) == 2
            and set(cfg.noise_band) <= set(pq) else {})
    first = next(iter(systems.values()))["report"]
    texts = first["query_text"]
    searched = ("full-corpus retrieval" if first.get("full_corpus", True) else
                f"a sampled corpus of {first['products']:,} products (every judged one included)")
    lines = [f"# Ablation on {cfg.prepared_dir}, split {cfg.split}", "",
             f"{len(texts)} queries, {searched}. Δ = row − reference, 95 % paired "
             "bootstrap interval over queries (2,000 resamples). GOA_gap: pairs ≥ 1 grade apart."
             + (" Bold: beyond the seed band (interval excludes 0 and |Δ| > the band's "
                "detectable effect)." if band else ""),
             "", "| system | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, s in systems.items():
        m = s["report"]["results"][s["system"]]
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}"
                                                  for k in metrics) + " |")
    if band:
        lines += ["", f"## Seed band: {cfg.noise_band[1]} − {cfg.noise_band[0]}", "",
                  "Two runs that differ only in their seed (data order, sampled candidates, "
                  "dropout). The smallest effect this design detects is the larger end of this "
                  "interval in absolute value.", "",
                  "| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics),
                  "| seed difference | " + " | ".join(str(band[k]) for k in metrics) + " |",
                  "| detectable effect | " + " | ".join(f"{detectable(band[k]):.4f}"
                                                      for k in metrics) + " |"]
    lines += ["", "## Differences", "", "| row | reference | " + " | ".join(metrics) + " |",
              "|---|---|" + "---:|" * len(metrics)]
    order = [a.name for a in cfg.arms if a.name in pq]
    refs = {name: [r for r in (arms[name].compare or order[max(i - 1, 0):i]) if r in pq]
            for i, name in enumerate(order)}
    extra = [n for n in systems if n not in arms]  # bm25 and hybrid, from an arm's report
    if "bm25" in pq:  # every system against BM25 too
        for name in [*order, *extra]:
            if name != "bm25" and arms.get(name, Arm(name)).kind not in ("zero_shot", "model"):
                refs.setdefault(name, []).append("bm25")
    diffs: dict[str, dict[str, str]] = {}
    for name in [*order, *extra]:
        for ref in refs.get(name, []):
            found = {k: paired_bootstrap(pq[ref], pq[name], k) for k in metrics}
            beyond = {k: bool(band) and beyond_band(found[k], band[k]) for k in metrics}
            diffs[f"{name} vs {ref}"] = {k: str(found[k]) for k in metrics} | {
                "beyond_seed_band": [k for k in metrics if beyond[k]]}
            lines.append(f"| {name} | {ref} | " + " | ".join(
                f"**{found[k]}**" if beyond[k] else str(found[k]) for k in metrics) + " |")
    strata = sorted({length_stratum(t) for t in texts.values()})
    counts = {s: sum(length_stratum(t) == s for t in texts.values()) for s in strata}
    lines += ["", "## NDCG@10 by query length (words)", "",
              "| system | " + " | ".join(f"{s} (n={counts[s]})" for s in strata) + " |",
              "|---|" + "---:|" * len(strata)]
    for name in systems:
        cells = []
        for s in strata:
            qs = [q for q, t in texts.items() if length_stratum(t) == s]
            vals = [pq[name][q]["ndcg@10"] for q in qs if q in pq[name]]
            cells.append(f"{sum(vals) / max(len(vals), 1):.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Differences by query length (NDCG@10, vs the first reference)", "",
              "| row | reference | " + " | ".join(strata) + " |",
              "|---|---|" + "---:|" * len(strata)]
    for name in [*order, *extra]:
        if not refs.get(name):
            continue
        ref = refs[name][0]
        cells = []
        for s in strata:
            qs = [q for q, t in texts.items() if length_stratum(t) == s]
            cells.append(str(paired_bootstrap(pq[ref], pq[name], "ndcg@10", queries=qs)))
        lines.append(f"| {name} | {ref} | " + " | ".join(cells) + " |")
    lines += ["", "## Budget", "",
              "| arm | kind | init | overrides | train s | mining s | eval s |",
              "|---|---|---|---|---:|---:|---:|"]
    for name in order:
        a = systems[name]["report"].get("arm", {})
        t = a.get("timing", {})
        lines.append(f"| {name} | {a.get('kind')} | {a.get('init')} | "
                     f"{'; '.join(a.get('set', [])) or '–'} | {t.get('train_s', '–')} | "
                     f"{t.get('mining_s', '–')} | {t.get('eval_s', '–')} |")
    out = Path(cfg.output_dir)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps({
        "results": {n: s["report"]["results"][s["system"]] for n, s in systems.items()},
        "differences": diffs,
        "seed_band": {k: str(v) for k, v in band.items()}}, indent=2))
    plot_curves(cfg, order, out / "curves.png")
    return "\n".join(lines)


def plot_curves(cfg: AblationConfig, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for name in order:
        training = Path(model_of(cfg, name)) / "training.json"
        if not training.is_file():
            continue
        history = json.loads(training.read_text()).get("history", [])
        steps = [h["step"] for h in history]
        for ax, key in zip(axes, ("loss", "in_batch_accuracy", "align_loss"), strict=True):
            if history and key in history[0]:  # align_loss: stage-2 arms (logged at beta 0 too)
                ax.plot(steps, [h.get(key, float("nan")) for h in history], label=name)
    for ax, title in zip(axes, ("training loss", "in-batch accuracy", "L_align (Eq. 6 / 6')"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--only", nargs="*", help="run these arms only")
    parser.add_argument("--summary", action="store_true", help="only rewrite the tables")
    args = parser.parse_args()
    configure_logging()
    cfg = from_dict(AblationConfig, load_yaml(args.config))
    validate(cfg)
    arms = {a.name: a for a in cfg.arms}
    if not args.summary:
        with ray_session():
            for arm in cfg.arms:
                if not args.only or arm.name in args.only:
                    run_arm(cfg, arm, arms)
                    summarize(cfg)
    print(summarize(cfg))


if __name__ == "__main__":
    main()
