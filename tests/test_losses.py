"""The losses against values worked out by hand (METHOD.md Eq. 1–6, and the distillation term)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from retrieval_platform.losses import (
    listwise_distillation_loss,
    masked_contrastive_loss,
    roar_loss,
    roar_objective,
)


def _two_queries():
    """q0 = (1, 0), q1 = (0, 1); candidates c0 = (1, 0) (q0's positive), c1 = (0.8, 0.6)
    (a hard negative), c2 = (0, 1) (q1's positive).  Scores: q0 -> [1, 0.8, 0], q1 -> [0, 0.6, 1].
    """
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], requires_grad=True)
    return q, c, torch.tensor([0, 2])


def test_contrastive_loss_without_masking():
    """τ = 0.5, m = 0.1: nothing is masked (no candidate scores above its positive's 1 + 0.1).
    q0: z = [2, 1.6, 0] -> log(1 + e^−0.4 + e^−2) = log 1.805655 = 0.590920
    q1: z = [0, 1.2, 2] -> log(1 + e^−0.8 + e^−2) = log 1.584664 = 0.460375
    mean = 0.525648."""
    q, c, pos = _two_queries()
    out = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.1)
    assert_close(out.loss, torch.tensor(0.525648), atol=1e-5, rtol=0)
    assert out.masked_fraction.item() == 0.0
    assert_close(out[0], out.loss)  # the loss is the first item


def _one_query_margin_case():
    """q = (1, 0); c0 = (0.8, 0.6) its positive (s = 0.8); c1 = (1, 0) scores 1.0, ABOVE
    0.8 + 0.1; c2 = (0.75, 0.661438) scores 0.75, just BELOW the positive (a hard negative)."""
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.75, 0.6614378]], requires_grad=True)
    return q, c, torch.tensor([0])


def test_margin_rule_drops_candidates_above_the_positive_and_keeps_hard_negatives():
    """τ = 0.5, m = 0.1: z = [1.6, 2.0, 1.5]; c1 (1.0 > 0.8 + 0.1) is a likely unlabelled
    positive and leaves the softmax; c2 (0.75, within m below) stays:
    L = log(1 + e^(1.5 − 1.6)) = log 1.904837 = 0.644397; 1 of 2 off-positive logits masked."""
    q, c, pos = _one_query_margin_case()
    out = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.1)
    assert_close(out.loss, torch.tensor(0.644397), atol=1e-5, rtol=0)
    assert_close(out.masked_fraction, torch.tensor(0.5))
    assert_close(out.margin_masked_fraction, torch.tensor(0.5))
    out.loss.backward()
    assert torch.equal(c.grad[1], torch.zeros(2))  # masked: no gradient
    assert c.grad[2].abs().sum() > 0  # the hard negative below the positive is learned from
    # A wider margin keeps c1 too (1.0 < 0.8 + 0.3): L = log(1 + e^0.4 + e^−0.1) = 1.222793.
    wide = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.3)
    assert_close(wide.loss, torch.tensor(1.222793), atol=1e-5, rtol=0)
    assert wide.masked_fraction.item() == 0.0


def test_catalog_and_label_rules_and_no_gradient_through_masked_logits():
    """c1 is masked for q1 by the catalog rule: q0 keeps 0.590920 (above), q1 loses c1:
    log(1 + e^−2) = 0.126928 -> mean 0.358924. c1 still gets gradient through q0."""
    q, c, pos = _two_queries()
    same_group = torch.tensor([[False, False, False], [False, True, False]])
    out = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.1, same_group=same_group)
    assert_close(out.loss, torch.tensor(0.358924), atol=1e-5, rtol=0)
    assert_close(out.known_masked_fraction, torch.tensor(0.25))
    # Masked for both queries: no gradient reaches c1.
    q, c, pos = _two_queries()
    both = torch.tensor([[False, True, False], [False, True, False]])
    out = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.1, same_group=both)
    assert_close(out.loss, torch.tensor((0.126928 + 0.126928) / 2), atol=1e-5, rtol=0)
    out.loss.backward()
    assert torch.equal(c.grad[1], torch.zeros(2))
    assert c.grad[0].abs().sum() > 0
    # The label rule does the same; the own positive is never masked, even if flagged.
    q, c, pos = _two_queries()
    known = torch.tensor([[True, True, False], [False, True, True]])
    out2 = masked_contrastive_loss(q, c, pos, tau=0.5, margin=None, known_positive=known)
    assert_close(out2.loss, out.loss)


def test_scores_are_float32_under_bf16_autocast():
    """The hard negative 0.005 below the positive survives bf16 autocast (bf16 rounds both to
    the same value near 0.9 and would give log 2 = 0.693)."""
    q = torch.tensor([[1.0, 0.0]])
    c = torch.nn.functional.normalize(torch.tensor([[0.9, 0.43589], [0.895, 0.44605]]), dim=1)
    s = (q @ c.T)[0]
    expected = torch.log1p(torch.exp((s[1] - s[0]) / 0.02))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_contrastive_loss(q, c, torch.tensor([0]), tau=0.02, margin=0.1)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, expected, atol=1e-4, rtol=0)


def test_contrastive_gradients_finite_at_low_temperature():
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    c = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    out = masked_contrastive_loss(q, c, torch.tensor([1, 0]), tau=0.01, margin=0.1)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


def _scores_for(probs: list[float], tau: float = 1.0) -> torch.Tensor:
    """Scores whose softmax at temperature τ is ``probs`` (they sum to 1)."""
    return torch.log(torch.tensor(probs)) * tau


def _all(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


def test_roar_three_groups_by_hand():
    """p = [0.4, 0.2 | 0.3 | 0.1], grades [3, 3 | 2 | 1], τ_a = 1, γ = 0.5.
    P̂ = [0.3, 0.3, 0.1]; ℓ = [log(3/7), log(3/7), log(1/9)].
    term 1 = −log σ(0 − 0.5) = log(1 + e^0.5) = 0.974077
    term 2 = −log σ(log(27/7) − 0.5) = log(1 + (7/27) e^0.5) = 0.355888
    C = 2: L_align = (0.974077 + 0.355888) / 2 = 0.664983.  With γ = 0 (the paper):
    term 1 = log 2 = 0.693147, term 2 = log(1 + 7/27) = 0.230524 -> 0.461836."""
    scores = _scores_for([0.4, 0.2, 0.3, 0.1]).unsqueeze(0)
    grades = torch.tensor([[3.0, 3.0, 2.0, 1.0]])
    loss = roar_loss(scores, grades, _all(grades), tau=1.0, gamma=0.5)
    assert_close(loss, torch.tensor(0.664983), atol=1e-5, rtol=0)
    paper = roar_loss(scores, grades, _all(grades), tau=1.0)
    assert_close(paper, torch.tensor(0.461836), atol=1e-5, rtol=0)


def test_roar_averages_over_all_adjacent_pairs_of_the_batch():
    """Row 0 as above (2 pairs: 0.693147, 0.230524 at γ = 0); row 1: p = [0.5 | 0.5] with
    grades [2 | 1] over a 4-wide row whose last two entries are padding (not present):
    ℓ equal, term = log 2. C = 3: (0.693147 + 0.230524 + 0.693147) / 3 = 0.538939
    (a mean of per-query means would give 0.577), not (0.461836 + 0.693147) / 2."""
    scores = torch.stack([_scores_for([0.4, 0.2, 0.3, 0.1]),
                          torch.tensor([0.3, 0.3, 0.9, -0.2])])
    grades = torch.tensor([[3.0, 3.0, 2.0, 1.0], [2.0, 1.0, 0.0, 0.0]])
    graded = torch.tensor([[True] * 4, [True, True, False, False]])
    present = torch.tensor([[True] * 4, [True, True, False, False]])
    loss = roar_loss(scores, grades, graded, tau=1.0, present=present)
    assert_close(loss, torch.tensor(0.538939), atol=1e-5, rtol=0)


def test_roar_softmax_runs_over_the_whole_row():
    """p = [0.4 (grade 3), 0.1 (grade 1), 0.5 (another query's candidate)], τ_a = 1, γ = 0.
    Whole row: ℓ = [log(0.4/0.6), log(0.1/0.9)], Δ = log 6, L = log(1 + 1/6) = 0.154151.
    Without the third entry (not present): p = [0.8, 0.2], Δ = log 16, L = log(17/16)."""
    scores = _scores_for([0.4, 0.1, 0.5]).unsqueeze(0)
    grades = torch.tensor([[3.0, 1.0, 0.0]])
    graded = torch.tensor([[True, True, False]])
    whole = roar_loss(scores, grades, graded, tau=1.0)
    assert_close(whole, torch.tensor(math.log(7 / 6)), atol=1e-5, rtol=0)
    own_only = roar_loss(scores, grades, graded, tau=1.0, present=graded)
    assert_close(own_only, torch.tensor(math.log(17 / 16)), atol=1e-5, rtol=0)


def test_roar_reduces_to_bradley_terry_for_single_product_groups():
    """One product a (grade 3) and one b (grade 2) among 20,000 ungraded ones, τ_a = 0.01:
    p_a, p_b are small, the normaliser cancels, ℓ_a − ℓ_b ≈ (s_a − s_b)/τ_a, and L_align is
    the Bradley–Terry loss −log σ(r_a − r_b − γ) on rewards r = s/τ_a."""
    tau = 0.01
    s_a, s_b = 0.23, 0.21
    scores = torch.cat([torch.tensor([s_a, s_b]), torch.full((20000,), 0.2)]).unsqueeze(0)
    grades = torch.cat([torch.tensor([3.0, 2.0]), torch.zeros(20000)]).unsqueeze(0)
    graded = torch.zeros_like(grades, dtype=torch.bool)
    graded[0, :2] = True
    for gamma in (0.0, 0.5):
        loss = roar_loss(scores, grades, graded, tau=tau, gamma=gamma)
        bt = -torch.nn.functional.logsigmoid(torch.tensor((s_a - s_b) / tau - gamma))
        assert_close(loss, bt, atol=1e-3, rtol=0)


def test_roar_is_invariant_to_order_inside_a_group_and_to_padding():
    torch.manual_seed(0)
    scores = torch.rand(1, 6) * 2 - 1
    grades = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0]])
    graded = _all(grades)
    base = roar_loss(scores, grades, graded, tau=0.05, gamma=0.5)
    perm = torch.tensor([5, 4, 0, 3, 1, 2])
    assert_close(roar_loss(scores[:, perm], grades[:, perm], graded, tau=0.05, gamma=0.5), base)
    pad = torch.tensor([[False, False]])
    padded = roar_loss(torch.cat([scores, torch.tensor([[0.9, -0.3]])], 1),
                       torch.cat([grades, torch.tensor([[5.0, 0.0]])], 1),
                       torch.cat([graded, pad], 1), tau=0.05, gamma=0.5,
                       present=torch.cat([graded, pad], 1))
    assert_close(padded, base)


def test_roar_empty_groups_and_single_group_queries_add_nothing():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.3], [0.2, 0.1, 0.0]])
    grades = torch.tensor([[3.0, 1.0, 1.0], [2.0, 2.0, 2.0], [9.0, 9.0, 9.0]])
    graded = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    only_first = roar_loss(scores[:1], grades[:1], graded[:1], tau=0.1, gamma=0.5)
    # Rows 2 and 3 have one group each; grade 2 and 9 are empty groups for row 1.
    all_rows = roar_loss(scores, grades, graded, tau=0.1, gamma=0.5)
    assert_close(all_rows, only_first)
    # Row 1's one pair spans grades 3 -> 1: margin γ·2 (the empty grade-2 group is skipped).
    p = torch.softmax(scores[0] / 0.1, 0)
    ell = lambda ph: math.log(ph / (1 - ph))  # noqa: E731
    expected = -torch.nn.functional.logsigmoid(
        torch.tensor(ell(p[0].item()) - ell((p[1].item() + p[2].item()) / 2) - 0.5 * 2))
    assert_close(only_first, expected, atol=1e-5, rtol=1e-5)
    # A batch with no pair at all (C = 0): zero, and backward still works.
    s = scores[1:].clone().requires_grad_()
    zero = roar_loss(s, grades[1:], graded[1:], tau=0.1, gamma=0.5)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_roar_gradients_finite_at_low_temperature_and_saturated_scores():
    scores = torch.tensor([[1.0, -1.0, -1.0, 1.0], [-1.0, 1.0, 1.0, -1.0]], requires_grad=True)
    grades = torch.tensor([[3.0, 2.0, 0.0, 0.0], [3.0, 3.0, 1.0, 0.0]])
    loss = roar_loss(scores, grades, _all(grades), tau=0.01, gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert scores.grad.abs().sum() > 0


def test_roar_products_three_groups_by_hand():
    """Eq. 5'/6' on the row of test_roar_three_groups_by_hand: p = [0.4, 0.2 | 0.3 | 0.1],
    grades [3, 3 | 2 | 1], τ_a = 1, γ = 0. ℓ = log(p / (1 − p)) = [log 2/3, log 1/4, log 3/7,
    log 1/9]; the adjacent-group pairs (0, 2), (1, 2), (2, 3):
    log(1 + 9/14) = 0.496437, log(1 + 12/7) = 0.998529 (the misordered pair), log(1 + 7/27) =
    0.230524; C' = 3 -> 0.575163 (the group mean gives 0.461836: it orders group maxima).
    With γ = 0.5 each margin drops by 0.5 a grade: log(1 + (9/14) e^0.5) = 0.755058, ..."""
    scores = _scores_for([0.4, 0.2, 0.3, 0.1]).unsqueeze(0)
    grades = torch.tensor([[3.0, 3.0, 2.0, 1.0]])
    loss = roar_loss(scores, grades, _all(grades), tau=1.0, pairing="products")
    assert_close(loss, torch.tensor(0.575163), atol=1e-5, rtol=0)
    with_gamma = roar_loss(scores, grades, _all(grades), tau=1.0, gamma=0.5, pairing="products")
    e = math.exp(0.5)
    expected = (math.log(1 + 9 / 14 * e) + math.log(1 + 12 / 7 * e) + math.log(1 + 7 / 27 * e)) / 3
    assert_close(with_gamma, torch.tensor(expected), atol=1e-5, rtol=0)


def test_roar_forms_agree_on_single_product_groups():
    """With one product a group, P̂ = p and Eq. 5'/6' is Eq. 5-6, across a padded batch with
    an empty grade between two groups and a query with one group."""
    torch.manual_seed(1)
    scores = torch.rand(3, 7) * 2 - 1
    grades = torch.tensor([[3.0, 2.0, 1.0, 0, 0, 0, 0], [3.0, 1.0, 0, 0, 0, 0, 0],
                           [2.0, 0, 0, 0, 0, 0, 0]])
    graded = torch.tensor([[True] * 3 + [False] * 4, [True] * 2 + [False] * 5,
                           [True] + [False] * 6])
    present = graded | torch.tensor([[False] * 5 + [True] * 2] * 3)
    for gamma in (0.0, 0.5):
        for tau in (1.0, 0.01):
            forms = [roar_loss(scores, grades, graded, tau=tau, gamma=gamma, present=present,
                               pairing=pairing) for pairing in ("group_mean", "products")]
            assert_close(forms[0], forms[1], atol=1e-5, rtol=1e-5)


def test_roar_products_reach_the_misordered_member_of_a_group():
    """At τ_a = 0.01 the group mean is its top member: the grade-3 product scored below the
    grade-2 one gets ~no gradient from Eq. 5-6, and a real push up from Eq. 5'/6'."""
    grades = torch.tensor([[3.0, 3.0, 2.0, 1.0]])
    grads = {}
    for pairing in ("group_mean", "products"):
        scores = torch.tensor([[0.9, 0.5, 0.6, 0.1]], requires_grad=True)
        roar_loss(scores, grades, _all(grades), tau=0.01, pairing=pairing).backward()
        grads[pairing] = scores.grad[0, 1].item()
    assert abs(grads["group_mean"]) < 1e-6
    assert grads["products"] < -10  # descent raises its score


def test_roar_rejects_an_unknown_pairing():
    with pytest.raises(ValueError, match="pairing"):
        roar_loss(torch.zeros(1, 2), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2, dtype=bool),
                  tau=1.0, pairing="pairs")


def test_roar_prefers_the_right_order():
    """Lower loss when the scores follow the grades than when they invert them."""
    grades = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    right = roar_loss(torch.tensor([[0.9, 0.6, 0.3, 0.0]]), grades, _all(grades), tau=0.01)
    wrong = roar_loss(torch.tensor([[0.0, 0.3, 0.6, 0.9]]), grades, _all(grades), tau=0.01)
    assert right < wrong


def test_stage2_objective_is_contrastive_plus_beta_align():
    assert_close(roar_objective(torch.tensor(0.5), torch.tensor(2.0), beta=0.1),
                 torch.tensor(0.7))


def test_margin_rule_spares_labelled_products():
    """q = (1, 0); its positive c0 = (0.6, 0.8) scores 0.6, a judged low-grade c1 = (1, 0)
    scores 1.0 > 0.6 + m: the margin rule masks it (loss 0) unless it is labelled, then
    L₁ = log(1 + e^{(1.0 − 0.6)/τ}) = log(1 + e^4) = 4.018150 at τ = 0.1."""
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    masked = masked_contrastive_loss(q, c, torch.tensor([0]), tau=0.1, margin=0.1)
    spared = masked_contrastive_loss(q, c, torch.tensor([0]), tau=0.1, margin=0.1,
                                     labelled=torch.tensor([[True, True]]))
    assert masked.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert spared.loss.item() == pytest.approx(math.log(1 + math.e ** 4), abs=1e-4)
    assert spared.margin_masked_fraction.item() == 0.0


def test_accuracy_ignores_the_margin_rule():
    """c1 outscores q's positive c0 (1.0 vs 0.6): the margin rule masks it, so the loss is
    zero, but the query is still counted as a miss; a known duplicate is not."""
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    out = masked_contrastive_loss(q, c, torch.tensor([0]), tau=0.1, margin=0.1)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6) and out.accuracy.item() == 0.0
    dup = masked_contrastive_loss(q, c, torch.tensor([0]), tau=0.1, margin=0.1,
                                  same_group=torch.tensor([[False, True]]))
    assert dup.accuracy.item() == 1.0


def test_stage2_loss_wires_the_roar_options():
    """stage2_loss (Eq. 7 on a gathered batch) passes pairing, the softmax row and the margin
    exemption through: its align term is roar_loss's on the same scores, and a query's judged
    low-grade product above its positive is masked by the margin rule only without
    ``exempt_labelled``."""
    from retrieval_platform.config import from_dict
    from retrieval_platform.training.config import TrainConfig
    from retrieval_platform.training.objectives import GlobalCandidates, stage2_loss

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.nn.functional.normalize(torch.tensor(
        [[0.8, 0.6], [0.7, 0.7], [1.0, 0.0], [0.1, 1.0], [0.5, 0.5], [0.5, -0.9]]), dim=1)
    batch = GlobalCandidates(
        queries=q, candidates=c, keys=torch.arange(6), groups=torch.arange(6),
        positive_keys=torch.tensor([[0], [3]]), top=torch.tensor([0, 3]),
        owner=torch.tensor([0, 0, 0, 1, 1, -1]), grade=torch.tensor([2.0, 1.0, 0.0, 2.0, 0.0, 0.0]))
    graded = batch.owner[None, :] == torch.arange(2)[:, None]
    grades = batch.grade[None, :].expand(2, -1)
    for pairing in ("group_mean", "products"):
        for row in ("batch", "graded"):
            for exempt in (False, True):
                cfg = from_dict(TrainConfig, {"stage": "roar", "loss": {
                    "tau": 0.1, "margin": 0.1, "tau_align": 0.05, "beta": 0.5,
                    "pairing": pairing, "align_softmax": row, "exempt_labelled": exempt}})
                loss, metrics = stage2_loss(batch, cfg)
                align = roar_loss(q @ c.T, grades, graded, tau=0.05, pairing=pairing,
                                  present=graded if row == "graded" else None)
                assert metrics["align_loss"] == pytest.approx(align.item(), abs=1e-6)
                assert loss.item() == pytest.approx(
                    metrics["contrastive_loss"] + 0.5 * align.item(), abs=1e-5)
                # q0's judged grade-0 product c2 = (1, 0) scores 1.0 > 0.8 + m
                assert (metrics["margin_masked_fraction"] == 0.0) == exempt


def test_listwise_distillation_by_hand():
    """Row 0: teacher [0, ln 3] at τ_T 1 → p_T = [1/4, 3/4]; student [0, 0] → p_S = [1/2, 1/2]:
    KL = 1/4·ln(1/2) + 3/4·ln(3/2) = 0.130812. Its third entry is padding (NaN teacher). Row 1
    has one entry: skipped. The gradient is (p_S − p_T) / τ_S = [1/4, −1/4]."""
    student = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, math.log(3.0), float("nan")], [1.0, float("nan"), 0.0]])
    in_list = torch.tensor([[True, True, False], [True, False, False]])
    loss = listwise_distillation_loss(student, teacher, in_list, tau_student=1.0,
                                      tau_teacher=1.0)
    assert loss.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    loss.backward()
    assert torch.allclose(student.grad, torch.tensor([[0.25, -0.25, 0.0], [0.0, 0.0, 0.0]]),
                          atol=1e-6)


def test_listwise_distillation_temperatures_and_degenerate_lists():
    teacher = torch.tensor([[4.0, 1.0, -2.0]])
    in_list = torch.ones(1, 3, dtype=torch.bool)
    # the student's cosines scaled to the teacher's distribution: KL 0 whatever the scales
    matched = teacher * 0.02 / 2.0
    assert listwise_distillation_loss(matched, teacher, in_list, tau_student=0.02,
                                      tau_teacher=2.0).item() == pytest.approx(0.0, abs=1e-6)
    # the student ordering the list the other way round costs more than a flat student
    flat = listwise_distillation_loss(torch.zeros(1, 3), teacher, in_list, tau_student=0.05,
                                      tau_teacher=1.0)
    reversed_ = listwise_distillation_loss(-matched, teacher, in_list, tau_student=0.05,
                                           tau_teacher=1.0)
    assert reversed_ > flat > 0
    # no row with two entries: 0, with a graph
    none = listwise_distillation_loss(torch.zeros(2, 3, requires_grad=True),
                                      torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool),
                                      tau_student=0.05, tau_teacher=1.0)
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError):
        listwise_distillation_loss(matched, teacher, in_list, tau_student=0.0, tau_teacher=1.0)
