"""Experiments without Serve: sticky weighted assignment, team-draft interleaving, the
impression log, the analysis (hand-worked values) and a simulated experiment it must decide."""

from __future__ import annotations

import os
import random
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pytest

from retrieval_platform.experiments.analysis import analyze
from retrieval_platform.experiments.arms import Arm, Experiment, ExperimentError, key_point
from retrieval_platform.experiments.eventlog import Event, EventLog, Impression, read_log
from retrieval_platform.experiments.interleaving import TEAM_A, TEAM_B, credit, team_draft
from retrieval_platform.experiments.simulation import ClickModel, SimulateConfig, _simulate

T = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _experiment(*weights: float, method: str = "ab") -> Experiment:
    return Experiment("e1", tuple(Arm(f"a{i}", f"v{i}", w) for i, w in enumerate(weights)),
                      method)


def test_keyed_assignment_follows_the_weights_and_is_sticky():
    experiment = _experiment(70, 20, 10)
    arms = [experiment.assign(f"user-{i}")[0].name for i in range(20_000)]
    share = {a: n / len(arms) for a, n in Counter(arms).items()}
    assert share == pytest.approx({"a0": 0.7, "a1": 0.2, "a2": 0.1}, abs=0.015)
    again = [experiment.assign(f"user-{i}") for i in range(20_000)]
    assert [a.name for a, _ in again] == arms and {how for _, how in again} == {"key"}
    # another experiment's name salts the hash: its split is independent of this one
    other = Experiment("e2", experiment.arms)
    both = Counter((a, other.assign(f"user-{i}")[0].name) for i, a in enumerate(arms))
    assert both[("a0", "a0")] / 20_000 == pytest.approx(0.49, abs=0.02)


def test_a_ramp_moves_only_the_keys_in_the_changed_share():
    before, after = _experiment(90, 10), _experiment(80, 20)
    moved = [i for i in range(10_000)
             if before.assign(f"u{i}")[0].name != after.assign(f"u{i}")[0].name]
    assert len(moved) / 10_000 == pytest.approx(0.10, abs=0.01)
    assert all(after.assign(f"u{i}")[0].name == "a1" for i in moved)  # into the grown arm


def test_without_a_key_the_arm_is_drawn_by_weight():
    experiment = _experiment(1, 3)
    rng = random.Random(0)
    drawn = [experiment.assign(None, rng) for _ in range(8000)]
    assert {how for _, how in drawn} == {"random"}
    assert sum(a.name == "a1" for a, _ in drawn) / 8000 == pytest.approx(0.75, abs=0.02)
    assert _experiment(0, 5).assign("anyone")[0].name == "a1"  # a stopped share gets nobody


def test_key_point_is_uniform():
    points = np.array([key_point("e", f"k{i}") for i in range(10_000)])
    assert points.min() >= 0 and points.max() < 1
    assert np.histogram(points, bins=10, range=(0, 1))[0].min() > 900


@pytest.mark.parametrize("arms, method, message", [
    ((), "ab", "at least one arm"),
    ((("a", 0), ("b", 0)), "ab", "sum to a positive"),
    ((("a", -1), ("b", 2)), "ab", "finite number >= 0"),
    ((("a", float("nan")), ("b", 2)), "ab", "finite number >= 0"),
    ((("a", 1), ("a", 2)), "ab", "repeat"),
    ((("a", 1),), "interleave", "two arms"),
    ((("a b", 1),), "ab", "letters, digits"),
])
def test_bad_experiments_are_refused_with_a_reason(arms, method, message):
    with pytest.raises(ExperimentError, match=message):
        Experiment("e1", tuple(Arm(n, "v", w) for n, w in arms), method)


def test_team_draft_by_hand():
    # rng draws: 0.9 (B first), then the teams alternate by pick count
    class Draws(random.Random):
        def __init__(self, values):
            super().__init__(0)
            self.values = list(values)

        def random(self):
            return self.values.pop(0)

    shown, teams = team_draft(["p1", "p2", "p3", "p4"], ["p2", "p5", "p1", "p6"], 4,
                              Draws([0.9, 0.1]))
    # B takes p2; A (behind) takes p1; tie -> coin 0.1: A takes p3; B (behind) takes p5
    assert shown == ["p2", "p1", "p3", "p5"]
    assert teams == [TEAM_B, TEAM_A, TEAM_A, TEAM_B]
    assert credit(teams, [1, 2, 3]) == (2, 1)


def test_team_draft_properties():
    rng = random.Random(1)
    for _ in range(200):
        pool = [f"p{i}" for i in range(12)]
        a, b = rng.sample(pool, 8), rng.sample(pool, 8)
        shown, teams = team_draft(a, b, 10, rng)
        assert len(shown) == len(set(shown)) == min(10, len(set(a) | set(b)))
        for team, ranking in ((TEAM_A, a), (TEAM_B, b)):
            picked = [p for p, t in zip(shown, teams, strict=True) if t == team]
            assert all(p in ranking for p in picked)
            assert picked == sorted(picked, key=ranking.index)  # in the team's own order
    same, _ = team_draft(["x", "y", "z"], ["x", "y", "z"], 3, rng)
    assert same == ["x", "y", "z"]  # identical rankings: the same list
    short, teams = team_draft(["x"], ["y", "z", "w"], 4, rng)
    assert sorted(short) == ["w", "x", "y", "z"] and teams.count(TEAM_A) == 1


def _impression(request_id, key, arm, products, teams=None, experiment="e1"):
    return Impression(request_id, T, experiment, key, "key", arm, f"v-{arm}", "q", "dense",
                      products, [1.0] * len(products), teams)


def test_the_log_is_bounded_partitioned_and_keeps_rows_storage_refused(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the log's folder should be")
    log = EventLog(str(blocked / "log"), writer="w1", max_buffered=3)
    for i in range(5):
        log.add(_impression(f"r{i}", "k", "a" if i % 2 else "b", ["p1"]))
    assert log.dropped == 2 and log.buffered == 3
    assert log.flush() == 0 and log.write_errors == 1 and log.buffered == 3  # kept
    blocked.unlink()
    assert log.flush() == 3 and log.buffered == 0
    files = sorted(p.relative_to(blocked / "log").parts[:3]
                   for p in (blocked / "log").rglob("*.parquet"))
    assert files == [("impressions", "day=2026-12-03", "arm=a"),
                     ("impressions", "day=2026-12-03", "arm=b")]
    log.write_events([Event("r1", "p1", "click", T)])
    impressions, events = read_log(str(blocked / "log"))
    assert sorted(impressions["request_id"].to_pylist()) == ["r0", "r1", "r2"]
    assert events.to_pylist() == [{"request_id": "r1", "product_id": "p1", "type": "click",
                                   "time": T}]


def test_analysis_by_hand(tmp_path):
    log = EventLog(str(tmp_path / "log"))
    # control: user u1 2 impressions (one clicked at rank 2), u2 1 impression (no click)
    # treatment: u3 1 impression clicked at rank 1 and ordered, u4 1 impression clicked at rank 1
    for rid, key, arm in [("c1", "u1", "control"), ("c2", "u1", "control"),
                          ("c3", "u2", "control"), ("t1", "u3", "treatment"),
                          ("t2", "u4", "treatment")]:
        log.add(_impression(rid, key, arm, ["p1", "p2", "p3"]))
    log.add(_impression("i1", "u5", "control+treatment", ["p1", "p2", "p3"],
                        ["control", "treatment", "control"]))
    log.flush()
    log.write_events([Event("c1", "p2", "click", T), Event("c1", "p2", "click", T),  # twice
                      Event("t1", "p1", "click", T), Event("t1", "p1", "add_to_cart", T),
                      Event("t1", "p1", "order", T), Event("t2", "p1", "click", T),
                      Event("i1", "p2", "click", T), Event("i1", "p3", "click", T),
                      Event("i1", "p4", "click", T), Event("nope", "p1", "click", T)])
    report = analyze(*read_log(str(tmp_path / "log")), k=10, replicates=300)
    arms = {a.arm: a for a in report.arms}
    assert arms["control"].impressions == 3 and arms["control"].users == 2
    assert arms["control"].metrics["ctr"].value == pytest.approx(1 / 3)
    assert arms["control"].metrics["mrr"].value == pytest.approx((1 / 2) / 3)
    assert arms["treatment"].metrics["ctr"].value == 1.0
    assert arms["treatment"].metrics["order"].value == 0.5
    assert arms["treatment"].metrics["add_to_cart"].value == 0.5
    ctr = next(c for c in report.comparisons if c.metric == "ctr")
    assert (ctr.arm, ctr.control) == ("treatment", "control")
    assert ctr.delta.value == pytest.approx(2 / 3)
    assert ctr.delta.low <= ctr.delta.value <= ctr.delta.high
    i = report.interleaving
    assert (i.arm_a, i.arm_b, i.wins_a, i.wins_b, i.ties) == ("control", "treatment", 0, 0, 1)
    assert report.unmatched_events == 2  # p4 was not shown; "nope" was never answered
    assert "| treatment − control | ctr | +0.6667" in report.markdown()


def test_a_simulated_experiment_finds_the_better_ranker(tmp_path):
    """Queries whose judged products the treatment ranks first and the control ranks last:
    both designs, through the log and the analysis, must find the treatment."""
    rng = random.Random(0)
    queries, qrels, rankings = {}, {}, {"control": {}, "treatment": {}}
    for q in range(40):
        products = [f"q{q}-p{i}" for i in range(10)]
        relevant = rng.sample(products, 3)
        qrels[f"q{q}"] = {p: 3.0 for p in relevant} | {products[0]: 1.0}
        queries[f"q{q}"] = f"query {q}"
        rest = [p for p in products if p not in relevant]
        rankings["treatment"][f"q{q}"] = relevant + rest
        rankings["control"][f"q{q}"] = rest + relevant

    def gain(grade):
        return np.clip((np.asarray(grade, dtype=float) - 1) / 2, 0, 1)

    cfg = SimulateConfig(prepared_dir="", control="", treatment="", output_dir="", users=300,
                         queries_per_user=2, clicks=ClickModel())
    for design in ("ab", "interleave"):
        _simulate(cfg, design, rankings, qrels, queries, gain, tmp_path / design)
        report = analyze(*read_log(str(tmp_path / design)), control="control", replicates=300)
        if design == "ab":
            ctr = next(c for c in report.comparisons if c.metric == "ctr")
            assert ctr.decided and ctr.delta.value > 0, report.markdown()
            assert sum(a.users for a in report.arms) == 300
        else:
            assert report.interleaving.winner == "treatment", report.markdown()


def test_the_cli_reads_arms_and_refuses_bad_ones(monkeypatch):
    # importing the CLI sets RAY_AUTH_MODE for its own process; restored after this test so
    # that the session's local Ray starts as every other test expects
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
    from retrieval_platform.cli import _arm_spec, main
    from retrieval_platform.errors import PlatformError

    assert _arm_spec("new=s3://bucket/indexes/v2:12.5") == {
        "name": "new", "index": "s3://bucket/indexes/v2", "weight": 12.5}
    for bad in ("new", "new=/idx", "new=/idx:lots"):
        with pytest.raises(PlatformError, match="--arm"):
            _arm_spec(bad)
    assert main(["experiment", "promote"]) == 2  # no --arm: a one-line error, nothing done
