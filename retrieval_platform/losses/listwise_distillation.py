"""Distillation of a teacher's scores into the dual encoder: listwise KL divergence.

For query i with a list L_i of candidates, a teacher score t_ij (a cross-encoder's logit, or
the hybrid's fused score) and the student's cosine s_ij = ⟨q_i, p_j⟩:

    p^T_ij = softmax_j( t_ij / τ_T )           the teacher's distribution over the list
    p^S_ij = softmax_j( s_ij / τ_S )           the student's
    L_KD   = (1/Q) Σ_i KL( p^T_i ‖ p^S_i ) = (1/Q) Σ_i Σ_j p^T_ij (log p^T_ij − log p^S_ij)

Not in the paper (METHOD.md has no distillation term): it is RocketQAv2's dynamic listwise
distillation (Ren et al., 2021, "RocketQAv2: A Joint Training Method for Dense Passage
Retrieval and Passage Re-ranking", Eq. 4–6) with Hinton et al.'s temperatures (2015). Why
listwise KL and not MarginMSE (Hofstätter et al., 2020): MarginMSE matches score *differences*
on one scale, which needs teacher and student scores of comparable range (a logit against a
cosine); the KL only asks that each list's *distribution* match, so τ_T and τ_S absorb the
scales, and every candidate of the list — judged or not — takes part at once.

Stage 2 adds it to Eq. 7: L = L₁ + β · L_align + λ · L_KD (``loss.distill_weight`` = λ).
Lists have different lengths and not every candidate has a teacher score: entries where
``in_list`` is false take no mass on either side.
"""

from __future__ import annotations

import torch


def listwise_distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                               in_list: torch.Tensor, *, tau_student: float,
                               tau_teacher: float) -> torch.Tensor:
    """Mean over queries of KL(softmax(teacher / τ_T) ‖ softmax(student / τ_S)) over each
    row's entries where ``in_list`` (Q, N) is true; ``student`` and ``teacher`` are (Q, N)
    scores. Rows with fewer than two entries are skipped (one candidate: nothing to match). A
    scalar; 0 (with a graph) when no row counts."""
    if tau_student <= 0 or tau_teacher <= 0:
        raise ValueError("tau_student and tau_teacher must be > 0")
    student, teacher = student.float(), teacher.float()
    neg_inf = torch.finfo(torch.float32).min
    # a padded teacher entry may be NaN (no score): masked before anything reads it
    teacher = torch.where(in_list, teacher, torch.zeros_like(teacher))  # (Q, N)
    log_p_t = torch.log_softmax((teacher / tau_teacher).masked_fill(~in_list, neg_inf),
                                dim=1)  # (Q, N)
    log_p_s = torch.log_softmax((student / tau_student).masked_fill(~in_list, neg_inf),
                                dim=1)  # (Q, N)
    per_query = (log_p_t.exp() * (log_p_t - log_p_s)).masked_fill(~in_list, 0.0).sum(1)  # (Q,)
    counted = in_list.sum(dim=1) >= 2  # (Q,)
    if not bool(counted.any()):
        return student.sum() * 0.0  # keeps the graph: every DDP worker back-propagates
    return per_query[counted].mean()
