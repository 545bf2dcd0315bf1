"""The reranker's loss: listwise softmax cross-entropy against grade-derived targets.

For query i with a list L_i of (query, product) pairs, each with a cross-encoder score s_ij and
the NDCG gain g_ij of its grade (mined, unjudged products: the scale's lowest gain):

    t_ij = softmax_j( g_ij / τ_t )              the target distribution over the list
    L    = −(1/Q) Σ_i Σ_j t_ij · log softmax_j( s_ij )

ListNet's top-one form (Cao et al., 2007, "Learning to Rank: From Pairwise Approach to Listwise
Approach"); with graded targets it is the listwise loss of cross-encoder rerankers trained on
graded labels (e.g. sentence-transformers' ``ListNetLoss``). Why these targets: the gain is the
grade's NDCG gain, the quantity the evaluation rewards, so a list's probability mass is ordered
as the metric orders its products, with the whole graded scale (Exact ≻ Substitute ≻ Complement
≻ Irrelevant, or Home Depot's mean ratings), not a binary cut. τ_t sets how sharply: on Home
Depot's gains (r − 1)/2, τ_t = 0.2 puts e^5 ≈ 148× the target mass on a 3 as on a 1, and
e^(1/1.2) ≈ 2.3× between ratings one rater's vote (1/6 of a gain) apart.

Lists have different lengths: padded entries (``mask`` false) take no target and no score mass.
"""

from __future__ import annotations

import torch


def graded_listwise_loss(scores: torch.Tensor, gains: torch.Tensor, mask: torch.Tensor,
                         target_tau: float = 0.2) -> torch.Tensor:
    """ListNet loss of ``scores`` (Q, L) against ``softmax(gains / target_tau)`` over each row's
    entries where ``mask`` (Q, L) is true; rows with fewer than two entries are skipped (nothing
    to order). A scalar; 0 when no row counts."""
    if target_tau <= 0:
        raise ValueError("target_tau must be > 0")
    scores, gains = scores.float(), gains.float()
    neg_inf = torch.finfo(torch.float32).min
    target = torch.softmax(gains.div(target_tau).masked_fill(~mask, neg_inf), dim=1)  # (Q, L)
    log_p = torch.log_softmax(scores.masked_fill(~mask, neg_inf), dim=1)  # (Q, L)
    per_query = -(target * log_p).masked_fill(~mask, 0.0).sum(dim=1)  # (Q,)
    counted = mask.sum(dim=1) >= 2  # (Q,)
    if not bool(counted.any()):
        return scores.sum() * 0.0  # keeps the graph: every DDP worker back-propagates
    return per_query[counted].mean()
