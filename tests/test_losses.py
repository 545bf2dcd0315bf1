"""The two losses against values worked out by hand (METHOD.md Eq. 1–6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from retrieval_platform.losses import masked_contrastive_loss, roar_loss


def _two_queries():
    """q0 = (1, 0), q1 = (0, 1); candidates c0 = (1, 0) (q0's positive), c1 = (0.8, 0.6)
    (a hard negative), c2 = (0, 1) (q1's positive).  Scores: q0 -> [1, 0.8, 0], q1 -> [0, 0.6, 1].
    """
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], requires_grad=True)
    return q, c, torch.tensor([0, 2])


def test_contrastive_loss_without_masking():
    """τ = 0.5, m = 0.1: nothing is masked (0.8 < 1 − 0.1 and 0.6 < 1 − 0.1).
    q0: z = [2, 1.6, 0] -> log(1 + e^−0.4 + e^−2) = log 1.805655 = 0.590920
    q1: z = [0, 1.2, 2] -> log(1 + e^−0.8 + e^−2) = log 1.584664 = 0.460375
    mean = 0.525648."""
    q, c, pos = _two_queries()
    out = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.1)
    assert_close(out.loss, torch.tensor(0.525648), atol=1e-5, rtol=0)
    assert out.masked_fraction.item() == 0.0


def test_margin_rule_masks_near_duplicates_of_the_positive():
    """m = 0.3: for q0, 0.8 > 1 − 0.3, so c1 leaves q0's softmax:
    q0: log(1 + e^−2) = 0.126928; q1 unchanged 0.460375; mean 0.293652; 1 of 4 logits masked."""
    q, c, pos = _two_queries()
    out = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.3)
    assert_close(out.loss, torch.tensor(0.293652), atol=1e-5, rtol=0)
    assert_close(out.masked_fraction, torch.tensor(0.25))
    assert_close(out.margin_masked_fraction, torch.tensor(0.25))


def test_catalog_and_label_rules_and_no_gradient_through_masked_logits():
    """c1 is masked for q0 by the margin rule and for q1 by the catalog rule: it is in no
    softmax, so it gets no gradient. q1: log(1 + e^−2) = 0.126928 -> mean 0.126928."""
    q, c, pos = _two_queries()
    same_group = torch.tensor([[False, False, False], [False, True, False]])
    out = masked_contrastive_loss(q, c, pos, tau=0.5, margin=0.3, same_group=same_group)
    assert_close(out.loss, torch.tensor(0.126928), atol=1e-5, rtol=0)
    out.loss.backward()
    assert torch.equal(c.grad[1], torch.zeros(2))
    assert c.grad[0].abs().sum() > 0
    # The label rule does the same; the own positive is never masked, even if flagged.
    q, c, pos = _two_queries()
    known = torch.tensor([[True, True, False], [False, True, True]])
    out2 = masked_contrastive_loss(q, c, pos, tau=0.5, margin=None, known_positive=known)
    assert_close(out2.loss, out.loss)


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


def test_roar_three_groups_by_hand():
    """p = [0.4, 0.2 | 0.3 | 0.1], grades [3, 3 | 2 | 1], τ = 1, β = 1, γ = 0.5.
    P̂ = [0.3, 0.3, 0.1]; ℓ = [log(3/7), log(3/7), log(1/9)].
    term 1 = −log σ(0 − 0.5) = log(1 + e^0.5) = 0.974077
    term 2 = −log σ(log(27/7) − 0.5) = log(1 + (7/27) e^0.5) = 0.355888
    loss = (0.974077 + 0.355888) / 2 = 0.664983."""
    scores = _scores_for([0.4, 0.2, 0.3, 0.1]).unsqueeze(0)
    grades = torch.tensor([[3.0, 3.0, 2.0, 1.0]])
    valid = torch.ones_like(grades, dtype=torch.bool)
    loss = roar_loss(scores, grades, valid, tau=1.0, beta=1.0, gamma=0.5)
    assert_close(loss, torch.tensor(0.664983), atol=1e-5, rtol=0)
    # Explicit weights pick single terms.
    first = roar_loss(scores, grades, valid, tau=1.0, beta=1.0, gamma=0.5,
                      group_weights=torch.tensor([[1.0, 0.0]]))
    assert_close(first, torch.tensor(math.log(1 + math.exp(0.5))), atol=1e-5, rtol=0)


def test_roar_reduces_to_bradley_terry_for_singletons_among_many():
    """One product a (grade 3) and one b (grade 2) among 2000 irrelevant ones: p_a, p_b are
    small, so ℓ_a − ℓ_b ≈ (s_a − s_b)/τ and the a–b term is −log σ(β (s_a − s_b)/τ − γ)."""
    tau, beta, gamma = 0.05, 1.0, 0.5
    s_a, s_b = 0.30, 0.25
    scores = torch.cat([torch.tensor([s_a, s_b]), torch.full((2000,), 0.2)]).unsqueeze(0)
    grades = torch.cat([torch.tensor([3.0, 2.0]), torch.zeros(2000)]).unsqueeze(0)
    valid = torch.ones_like(grades, dtype=torch.bool)
    term_ab = roar_loss(scores, grades, valid, tau=tau, beta=beta, gamma=gamma,
                        group_weights=torch.tensor([[1.0, 0.0]]))
    bt = -torch.nn.functional.logsigmoid(torch.tensor(beta * (s_a - s_b) / tau - gamma))
    assert_close(term_ab, bt, atol=2e-3, rtol=0)


def test_roar_is_invariant_to_order_inside_a_group_and_to_padding():
    torch.manual_seed(0)
    scores = torch.rand(1, 6) * 2 - 1
    grades = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0]])
    valid = torch.ones_like(grades, dtype=torch.bool)
    base = roar_loss(scores, grades, valid, tau=0.05, beta=1.0, gamma=0.5)
    perm = torch.tensor([5, 4, 0, 3, 1, 2])
    assert_close(roar_loss(scores[:, perm], grades[:, perm], valid, tau=0.05, beta=1.0,
                           gamma=0.5), base)
    padded = roar_loss(torch.cat([scores, torch.tensor([[0.9, -0.3]])], 1),
                       torch.cat([grades, torch.tensor([[5.0, 0.0]])], 1),
                       torch.cat([valid, torch.tensor([[False, False]])], 1),
                       tau=0.05, beta=1.0, gamma=0.5)
    assert_close(padded, base)


def test_roar_empty_groups_and_single_group_queries_add_nothing():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.3], [0.2, 0.1, 0.0]])
    grades = torch.tensor([[3.0, 1.0, 1.0], [2.0, 2.0, 2.0], [9.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    only_first = roar_loss(scores[:1], grades[:1], valid[:1], tau=0.1, beta=1.0, gamma=0.5)
    # Rows 2 and 3 have one group each; grade 2 and 9 are empty groups for row 1.
    all_rows = roar_loss(scores, grades, valid, tau=0.1, beta=1.0, gamma=0.5)
    assert_close(all_rows, only_first)
    # Row 1's one pair spans grades 3 -> 1: margin γ·2 (the empty grade-2 group is skipped).
    p = torch.softmax(scores[0] / 0.1, 0)
    ell = lambda ph: math.log(ph / (1 - ph))  # noqa: E731
    expected = -torch.nn.functional.logsigmoid(
        torch.tensor(ell(p[0].item()) - ell((p[1].item() + p[2].item()) / 2) - 0.5 * 2))
    assert_close(only_first, expected, atol=1e-5, rtol=1e-5)
    # A batch with no pair at all: zero, and backward still works.
    s = scores[1:].clone().requires_grad_()
    zero = roar_loss(s, grades[1:], valid[1:], tau=0.1, beta=1.0, gamma=0.5)
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_roar_gradients_finite_at_low_temperature_and_saturated_scores():
    scores = torch.tensor([[1.0, -1.0, -1.0, 1.0], [-1.0, 1.0, 1.0, -1.0]], requires_grad=True)
    grades = torch.tensor([[3.0, 2.0, 0.0, 0.0], [3.0, 3.0, 1.0, 0.0]])
    valid = torch.ones_like(grades, dtype=torch.bool)
    loss = roar_loss(scores, grades, valid, tau=0.01, beta=1.0, gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert scores.grad.abs().sum() > 0


def test_roar_prefers_the_right_order():
    """Lower loss when the scores follow the grades than when they invert them."""
    grades = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    valid = torch.ones_like(grades, dtype=torch.bool)
    right = roar_loss(torch.tensor([[0.9, 0.6, 0.3, 0.0]]), grades, valid, tau=0.05, beta=1.0,
                      gamma=0.5)
    wrong = roar_loss(torch.tensor([[0.0, 0.3, 0.6, 0.9]]), grades, valid, tau=0.05, beta=1.0,
                      gamma=0.5)
    assert right < wrong


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
