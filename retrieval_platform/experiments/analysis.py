"""The analysis of an experiment's log: per-arm rates with 95 % bootstrap intervals over users,
each arm against the control, and the interleaving preference.

Metrics per impression (one answered search), averaged over an arm's impressions:
CTR@k (an impression with a click in its top k), add-to-cart and order rates (an impression with
at least one such event), and the reciprocal rank of the first click in the top k (MRR; 0
without a click). Users, not impressions, are the unit of resampling: one user's searches are
correlated, and treating them as independent would make the intervals too narrow. Requests
without a key are their own units. The bootstrap is the Poisson bootstrap (each unit weighted
by a Poisson(1) draw per replicate), which suits logs of any size and is how large online
experiments are analysed (Chamandy et al., "Estimating uncertainty for massive data streams",
Google 2012). Arms of an A/B split hold disjoint users, so each is resampled on its own and the
difference of their replicates gives its interval.

Interleaving (``interleaving.team_draft``): an impression with clicks is a win for the arm
credited with more of them, or a tie; the preference of B over A is
(wins B − wins A) / (wins A + wins B + ties), resampled over users.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval_platform.errors import PlatformError
from retrieval_platform.experiments.eventlog import INTERLEAVED_SEP, read_log
from retrieval_platform.io import write_json

METRICS = ("ctr", "add_to_cart", "order", "mrr")
REPLICATES = 1000


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class ArmReport:
    arm: str
    versions: list[str]
    impressions: int
    users: int
    metrics: dict[str, Interval]


@dataclass(frozen=True)
class Comparison:
    arm: str
    control: str
    metric: str
    delta: Interval  # arm − control

    @property
    def decided(self) -> bool:
        return self.delta.low > 0 or self.delta.high < 0


@dataclass(frozen=True)
class InterleavingReport:
    arm_a: str
    arm_b: str
    impressions: int  # interleaved impressions with at least one click
    users: int
    wins_a: int
    wins_b: int
    ties: int
    preference_b: Interval  # > 0: B is preferred

    @property
    def winner(self) -> str | None:
        if self.preference_b.low > 0:
            return self.arm_b
        if self.preference_b.high < 0:
            return self.arm_a
        return None


@dataclass
class ExperimentReport:
    k: int
    arms: list[ArmReport] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    interleaving: InterleavingReport | None = None
    unmatched_events: int = 0  # events whose request id or product was not in an impression

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"| arm | versions | impressions | users | CTR@{self.k} | add-to-cart | "
                 "order | MRR |", "|---|---|---:|---:|---:|---:|---:|---:|"] if self.arms else []
        for a in self.arms:
            lines.append(f"| {a.arm} | {', '.join(a.versions)} | {a.impressions} | {a.users} | "
                         + " | ".join(str(a.metrics[m]) for m in METRICS) + " |")
        if self.comparisons:
            lines += ["", "| arm − control | metric | difference (95 % CI) | decided |",
                      "|---|---|---:|---|"]
            lines += [f"| {c.arm} − {c.control} | {c.metric} | {c.delta.value:+.4f} "
                      f"[{c.delta.low:+.4f}, {c.delta.high:+.4f}] | "
                      f"{'yes' if c.decided else 'no'} |" for c in self.comparisons]
        if (i := self.interleaving) is not None:
            lines += [""] * bool(lines) + [
                      f"Interleaving {i.arm_a} vs {i.arm_b}: {i.impressions} impressions "
                      f"with clicks from {i.users} users; wins {i.wins_a} / {i.wins_b}, ties "
                      f"{i.ties}; preference for {i.arm_b}: {i.preference_b.value:+.4f} "
                      f"[{i.preference_b.low:+.4f}, {i.preference_b.high:+.4f}]; winner: "
                      f"{i.winner or 'not decided'}"]
        if self.unmatched_events:
            lines += ["", f"{self.unmatched_events} events matched no impression."]
        return "\n".join(lines)


@dataclass
class _Outcomes:
    """Per impression: its unit (user), arm, and outcomes."""

    unit: np.ndarray  # (n,) int: the user's index
    arm: np.ndarray  # (n,) object
    version: np.ndarray  # (n,) object
    values: dict[str, np.ndarray]  # metric -> (n,) float
    credit: np.ndarray  # (n, 2) int: clicks credited to the first and second team
    interleaved: np.ndarray  # (n,) bool
    unmatched: int


def _outcomes(impressions: pa.Table, events: pa.Table, k: int) -> _Outcomes:
    imp = impressions.to_pydict()
    n = len(imp["request_id"])
    row_of = {r: i for i, r in enumerate(imp["request_id"])}
    ranks = [{p: j for j, p in enumerate(ids[:k])} for ids in imp["product_ids"]]
    first_click = np.full(n, np.inf)
    any_event = {t: np.zeros(n) for t in ("click", "add_to_cart", "order")}
    credit = np.zeros((n, 2), dtype=np.int64)
    unmatched = 0
    seen: set[tuple[str, str, str]] = set()  # an event repeated counts once
    ev = events.to_pydict()
    for request_id, product_id, kind in zip(ev["request_id"], ev["product_id"], ev["type"],
                                            strict=True):
        i = row_of.get(request_id)
        rank = ranks[i].get(product_id) if i is not None else None
        if rank is None:
            unmatched += 1
            continue
        if (request_id, product_id, kind) in seen:
            continue
        seen.add((request_id, product_id, kind))
        any_event[kind][i] = 1.0
        if kind == "click":
            first_click[i] = min(first_click[i], rank)
            teams = imp["teams"][i]
            if teams:  # interleaved: credit the team that placed the product
                credit[i, imp["arm"][i].split(INTERLEAVED_SEP).index(teams[rank])] += 1
    keys = [h if h else f"request:{r}" for h, r in zip(imp["key_hash"], imp["request_id"],
                                                      strict=True)]
    _, unit = np.unique(np.array(keys, dtype=object), return_inverse=True)
    values = {"ctr": any_event["click"], "add_to_cart": any_event["add_to_cart"],
              "order": any_event["order"],
              "mrr": np.where(np.isfinite(first_click), 1.0 / (first_click + 1.0), 0.0)}
    interleaved = np.array([bool(t) for t in imp["teams"]], dtype=bool)
    return _Outcomes(unit, np.array(imp["arm"], dtype=object),
                     np.array(imp["version"], dtype=object), values, credit, interleaved,
                     unmatched)


def _poisson_ratio(num: np.ndarray, den: np.ndarray, rng: np.random.Generator,
                   replicates: int = REPLICATES, chunk: int = 100) -> np.ndarray:
    """(replicates,) bootstrap replicates of sum(num) / sum(den) over units (Poisson(1)
    weights)."""
    out = []
    for start in range(0, replicates, chunk):
        w = rng.poisson(1.0, size=(min(chunk, replicates - start), len(num)))  # (c, units)
        out.append((w @ num) / np.maximum(w @ den, 1e-12))  # (c,)
    return np.concatenate(out)


def _per_unit(o: _Outcomes, mask: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(impressions per unit, metric sums per unit) over the impressions in ``mask``."""
    units, inverse = np.unique(o.unit[mask], return_inverse=True)
    den = np.bincount(inverse, minlength=len(units)).astype(float)
    nums = {m: np.bincount(inverse, weights=o.values[m][mask], minlength=len(units))
            for m in METRICS}
    return den, nums


def _interval(value: float, replicates: np.ndarray) -> Interval:
    low, high = np.percentile(replicates, [2.5, 97.5])
    return Interval(float(value), float(low), float(high))


def analyze(impressions: pa.Table, events: pa.Table, *, k: int = 10,
            control: str | None = None, seed: int = 0,
            replicates: int = REPLICATES) -> ExperimentReport:
    """Per-arm rates, each arm against ``control`` (default: the first arm by name, or the
    arm named control), and the interleaving preference, each with a 95 % interval."""
    rng = np.random.default_rng(seed)
    o = _outcomes(impressions, events, k)
    report = ExperimentReport(k=k, unmatched_events=o.unmatched)
    ab = ~o.interleaved
    arms = sorted(set(o.arm[ab]))
    reps: dict[str, dict[str, np.ndarray]] = {}
    for arm in arms:
        mask = ab & (o.arm == arm)
        den, nums = _per_unit(o, mask)
        reps[arm] = {m: _poisson_ratio(nums[m], den, rng, replicates) for m in METRICS}
        report.arms.append(ArmReport(
            arm, sorted(set(o.version[mask])), int(mask.sum()), len(den),
            {m: _interval(nums[m].sum() / den.sum(), reps[arm][m]) for m in METRICS}))
    if len(arms) > 1:
        base = control if control in arms else ("control" if "control" in arms else arms[0])
        value = {a.arm: a.metrics for a in report.arms}
        for arm in arms:
            if arm == base:
                continue
            for m in METRICS:
                report.comparisons.append(Comparison(arm, base, m, _interval(
                    value[arm][m].value - value[base][m].value, reps[arm][m] - reps[base][m])))
    if o.interleaved.any():
        report.interleaving = _interleaving(o, rng, replicates)
    return report


def _interleaving(o: _Outcomes, rng: np.random.Generator,
                  replicates: int) -> InterleavingReport:
    arm_a, arm_b = o.arm[o.interleaved][0].split(INTERLEAVED_SEP)
    clicked = o.interleaved & (o.credit.sum(axis=1) > 0)
    a, b = o.credit[clicked, 0], o.credit[clicked, 1]
    win_a, win_b, tie = (a > b).astype(float), (b > a).astype(float), (a == b).astype(float)
    units, inverse = np.unique(o.unit[clicked], return_inverse=True)
    per_unit = [np.bincount(inverse, weights=x, minlength=len(units))
                for x in (win_a, win_b, tie)]
    num = per_unit[1] - per_unit[0]  # (units,)
    den = per_unit[0] + per_unit[1] + per_unit[2]  # (units,)
    value = num.sum() / max(den.sum(), 1e-12)
    boot = _poisson_ratio(num, den, rng, replicates) if len(units) else np.zeros(1)
    return InterleavingReport(arm_a, arm_b, int(clicked.sum()), len(units), int(win_a.sum()),
                              int(win_b.sum()), int(tie.sum()), _interval(value, boot))


@dataclass
class AnalyzeConfig:
    log: str  # the impression log's location (AppArgs.impressions.path)
    output_dir: str
    k: int = 10
    control: str | None = None  # default: the arm named control, or the first by name
    experiment: str | None = None  # only this experiment's impressions (default: all)
    replicates: int = REPLICATES
    seed: int = 0


def analyze_log(cfg: AnalyzeConfig) -> ExperimentReport:
    """The body of ``data_jobs.analyze_experiment``: read, analyse, write report.md and
    report.json to ``output_dir``."""
    impressions, events = read_log(cfg.log)
    if cfg.experiment is not None:
        impressions = impressions.filter(pc.equal(impressions["experiment"], cfg.experiment))
    if impressions.num_rows == 0:
        raise PlatformError(f"{cfg.log}: no impressions"
                                    + (f" of experiment {cfg.experiment}" if cfg.experiment
                                       else ""))
    report = analyze(impressions, events, k=cfg.k, control=cfg.control, seed=cfg.seed,
                     replicates=cfg.replicates)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report.markdown() + "\n")
    write_json(out / "report.json", report.to_dict())
    return report
