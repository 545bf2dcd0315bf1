"""A bounded simulation of an online experiment on judged queries: simulated shoppers search,
a position-based click model turns the graded judgments into clicks, add-to-carts and orders,
and the platform's own log and analysis (``eventlog``, ``analysis``) must find the arm that is
better offline (NDCG@10).

Click model (position-based; Craswell et al., "An experimental comparison of click
position-bias models", WSDM 2008): a shopper examines rank r (0-based) with probability
``1 / (r + 1) ** eta`` and clicks an examined product with probability
``noise + (top - noise) * gain(grade)``, gain in [0, 1] from the dataset's grade scale; an
unjudged product is clicked at the noise rate. A click adds to cart with probability
``cart * gain`` and an add-to-cart becomes an order with probability ``order``.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.experiments.analysis import analyze
from retrieval_platform.experiments.arms import Arm, Experiment, key_hash
from retrieval_platform.experiments.eventlog import (
    INTERLEAVED_SEP,
    Event,
    EventLog,
    Impression,
    now,
    read_log,
)
from retrieval_platform.experiments.interleaving import team_draft
from retrieval_platform.io import write_json
from retrieval_platform.metrics import ndcg_at_k
from retrieval_platform.serving.search import LocalSearcher
from retrieval_platform.stats import paired_bootstrap

log = logging.getLogger(__name__)


@dataclass
class ClickModel:
    eta: float = 1.0  # examination decays as 1 / (rank + 1) ** eta
    noise: float = 0.05  # click probability of an examined irrelevant or unjudged product
    top: float = 0.9  # ... of an examined product of the highest grade
    cart: float = 0.5  # P(add to cart | click) = cart * gain
    order: float = 0.5  # P(order | add to cart)


@dataclass
class SimulateConfig:
    prepared_dir: str
    control: str  # index version folder of the control arm
    treatment: str  # ... of the treatment arm
    output_dir: str
    split: str = "dev"
    mode: str = "dense"
    k: int = 10
    users: int = 8000  # simulated shoppers of each design (A/B and interleaving)
    queries_per_user: int = 3
    user_grid: list[int] = field(default_factory=lambda: [250, 500, 1000, 2000, 4000, 8000])
    clicks: ClickModel = field(default_factory=ClickModel)
    replicates: int = 500
    repeats: int = 10  # independent populations: the power at each number of users
    power: float = 0.8  # users needed: the fewest with which this share finds the better arm
    seed: int = 0


def _rankings(index_dir: str, queries: dict[str, str], k: int, mode: str
              ) -> dict[str, list[str]]:
    searcher = LocalSearcher(index_dir)
    return {q: [h["product_id"] for h in searcher.search(text, k, mode)]
            for q, text in queries.items()}


def _shopper(shown: list[str], judged: dict[str, float], gain, m: ClickModel,
             rng: random.Random) -> list[tuple[int, str]]:
    """(rank, event type) of one impression under the click model."""
    events = []
    for r, product in enumerate(shown):
        g = float(gain(judged[product])) if product in judged else 0.0
        if rng.random() >= 1.0 / (r + 1) ** m.eta:
            continue
        if rng.random() >= m.noise + (m.top - m.noise) * g:
            continue
        events.append((r, "click"))
        if rng.random() < m.cart * g:
            events.append((r, "add_to_cart"))
            if rng.random() < m.order:
                events.append((r, "order"))
    return events


def _simulate(cfg: SimulateConfig, design: str, rankings: dict[str, dict[str, list[str]]],
              qrels: dict[str, dict[str, float]], queries: dict[str, str], gain,
              root: Path, repeat: int = 0) -> None:
    """``cfg.users`` shoppers searching under ``design`` (ab | interleave), logged at ``root``
    (``repeat``: another independent population)."""
    rng = random.Random(f"{cfg.seed}-{design}-{repeat}")
    experiment = Experiment(f"sim-{design}", (Arm("control", "control", 1.0),
                                             Arm("treatment", "treatment", 1.0)),
                            "ab" if design == "ab" else "interleave")
    eventlog = EventLog(str(root), writer=design, max_buffered=10**9)
    events: list[Event] = []
    qids = sorted(queries)
    for u in range(cfg.users):
        key = f"user-{u}"
        for _ in range(cfg.queries_per_user):
            qid = rng.choice(qids)
            request_id = f"{design}-{u}-{len(events)}-{rng.getrandbits(32):08x}"
            if design == "ab":
                arm, _ = experiment.assign(key)
                shown, teams, arm_name = rankings[arm.name][qid], None, arm.name
            else:
                shown, team_ids = team_draft(rankings["control"][qid],
                                             rankings["treatment"][qid], cfg.k, rng)
                teams = [("control", "treatment")[t] for t in team_ids]
                arm_name = INTERLEAVED_SEP.join(("control", "treatment"))
            t = now()
            eventlog.add(Impression(request_id, t, experiment.name, key_hash(key), "key",
                                    arm_name, arm_name, queries[qid], cfg.mode, list(shown),
                                    [0.0] * len(shown), teams))
            events += [Event(request_id, shown[r], kind, t)
                       for r, kind in _shopper(shown, qrels[qid], gain, cfg.clicks, rng)]
    eventlog.flush()
    if events:
        eventlog.write_events(events)


def simulate(cfg: SimulateConfig) -> dict:
    """Offline NDCG@k of both arms, then A/B and interleaving over growing numbers of
    simulated users: the analysis's answer at each, and the users each design needed."""
    ds = PreparedDataset(cfg.prepared_dir)
    qrels = ds.qrels(cfg.split)
    texts = ds.query_texts(cfg.split)
    queries = {q: texts[q] for q in sorted(qrels) if q in texts}
    rankings = {"control": _rankings(cfg.control, queries, cfg.k, cfg.mode),
                "treatment": _rankings(cfg.treatment, queries, cfg.k, cfg.mode)}
    ndcg = {arm: {q: {"ndcg": ndcg_at_k(r[q], qrels[q], ds.scale.gain, cfg.k)}
                  for q in queries} for arm, r in rankings.items()}
    offline = paired_bootstrap(ndcg["control"], ndcg["treatment"], "ndcg", seed=cfg.seed)
    better = "treatment" if offline.delta > 0 else "control"
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "config": asdict(cfg), "queries": len(queries),
        "offline_ndcg": {arm: float(np.mean([m["ndcg"] for m in per_query.values()]))
                         for arm, per_query in ndcg.items()} | {
            "treatment_minus_control": str(offline)},
        "better_offline": better, "designs": {}}
    for design in ("ab", "interleave"):
        runs: list[list[dict]] = []
        for repeat in range(cfg.repeats):
            with tempfile.TemporaryDirectory(prefix="rp-sim-") as tmp:
                _simulate(cfg, design, rankings, qrels, queries, ds.scale.gain, Path(tmp),
                          repeat)
                impressions, events = read_log(tmp)
            rows = []
            for n in cfg.user_grid:
                keep = pa.array([key_hash(f"user-{u}") for u in range(min(n, cfg.users))])
                mask = pc.is_in(impressions["key_hash"], value_set=keep)
                report = analyze(impressions.filter(mask), events, k=cfg.k, control="control",
                                 seed=cfg.seed + repeat, replicates=cfg.replicates)
                rows.append(_row(n, design, report))
            runs.append(rows)
            if repeat == 0:
                result["designs"][design] = {"first_run": rows, "report": report.markdown()}
            log.info("%s, population %d: %s", design, repeat,
                     [(r["users"], r["winner"]) for r in rows])
        # power: the share of independent populations whose analysis names the better arm
        power = [{"users": n, "found_better": sum(r[i]["winner"] == better for r in runs)
                  / len(runs), "found_worse": sum(r[i]["winner"] not in (None, better)
                                                  for r in runs) / len(runs)}
                 for i, n in enumerate(cfg.user_grid)]
        needed = next((p["users"] for p in power if p["found_better"] >= cfg.power), None)
        result["designs"][design] |= {"power": power, "users_needed": needed}
    write_json(out / "simulation.json", result)
    return result


def _row(n: int, design: str, report) -> dict:
    if design == "ab":
        ctr = next(c for c in report.comparisons if c.metric == "ctr")
        winner = None if not ctr.decided else ("treatment" if ctr.delta.value > 0
                                               else "control")
        arms = {a.arm: str(a.metrics["ctr"]) for a in report.arms}
        return {"users": n, "ctr_control": arms.get("control"),
                "ctr_treatment": arms.get("treatment"),
                "ctr_difference": f"{ctr.delta.value:+.4f} [{ctr.delta.low:+.4f}, "
                                  f"{ctr.delta.high:+.4f}]", "winner": winner}
    i = report.interleaving
    return {"users": n, "impressions_with_clicks": i.impressions, "wins_control": i.wins_a,
            "wins_treatment": i.wins_b, "ties": i.ties,
            "preference_treatment": f"{i.preference_b.value:+.4f} [{i.preference_b.low:+.4f}, "
                                    f"{i.preference_b.high:+.4f}]", "winner": i.winner}
