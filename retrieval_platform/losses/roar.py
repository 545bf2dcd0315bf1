"""Stage 2: ROAR, Relative Odds Alignment for Retrieval (METHOD.md Eq. 4–6).

For each query q with candidates C_q grouped by grade, G_1 ≻ G_2 ≻ … ≻ G_K (empty groups
dropped; K and the group sizes vary between queries):

    (4) p_d = softmax_{d ∈ C_q}( s(q, d) / τ )
    (5) P̂_k = (1/|G_k|) Σ_{d ∈ G_k} p_d,      ℓ_k = log P̂_k − log(1 − P̂_k)
    (6) L_ROAR(q) = Σ_{k=1}^{K−1} w_k · −log σ( β (ℓ_k − ℓ_{k+1}) − γ (g_k − g_{k+1}) )

with g_k the grade of group k and w_k = 1/(K−1) by default. The trainer adds Eq. 7's λ·L₁ term.

It extends Bradley–Terry (Bradley & Terry, 1952; as a preference loss: Rafailov et al., 2023,
DPO; odds ratios: Hong et al., 2024, ORPO) from pairs to variable-sized graded groups: with one
product per group and small probabilities, ℓ_a − ℓ_b ≈ (s_a − s_b)/τ and each term is the
Bradley–Terry loss with margin γ(g_a − g_b).

Numerics: log(1 − P̂_k) is computed as the log of the complement mass,
    1 − P̂_k = Σ_{d ∉ G_k} p_d + (1 − 1/|G_k|) Σ_{d ∈ G_k} p_d,
with one logsumexp, which is exactly log1mexp(log P̂_k) but keeps full precision when P̂_k → 1
(a float32 log1mexp would return −∞ there, at τ = 0.01 and scores of ±1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = -1e9  # "minus infinity" that keeps logsumexp and its gradient finite on empty rows


def roar_loss(
    scores: torch.Tensor,
    grades: torch.Tensor,
    valid: torch.Tensor,
    *,
    tau: float,
    beta: float,
    gamma: float,
    group_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 4–6 of METHOD.md, averaged over the queries that have at least two groups.

    Args:
        scores: (Q, C) cosine similarities s(q, d).
        grades: (Q, C) grade values, higher is better; equal values form one group.
        valid: (Q, C) bool, which entries are real candidates (the rest is padding).
        tau, beta, gamma: τ, β, γ of Eq. 4 and 6.
        group_weights: optional (Q, P) weights w_k of the consecutive group pairs of each query,
            in group order (best first); P at least the largest K − 1. Default 1/(K − 1).

    Queries with fewer than two non-empty groups have no pair and contribute nothing: they are
    left out of the average (and an all-empty batch gives a zero loss that still backpropagates).
    """
    valid = valid.bool()
    logits = (scores / tau).masked_fill(~valid, _NEG)  # (Q, C)
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (Q, C)  Eq. 4

    levels = torch.unique(grades[valid]).flip(0)  # (U,) best first
    U = levels.numel()
    member = (grades.unsqueeze(-1) == levels) & valid.unsqueeze(-1)  # (Q, C, U)
    size = member.sum(1)  # (Q, U)
    present = size > 0  # (Q, U)
    n = size.clamp(min=1).to(logp.dtype)  # (Q, U)

    lp = logp.unsqueeze(-1)  # (Q, C, 1)
    log_mass = torch.logsumexp(lp.masked_fill(~member, _NEG), dim=1)  # (Q, U)  log Σ_{G_k} p_d
    log_p_hat = log_mass - n.log()  # (Q, U)  Eq. 5: log P̂_k
    # log(1 − P̂_k): members weighted by (1 − 1/|G_k|), everyone else by 1.
    ones = torch.ones_like(member, dtype=lp.dtype)
    comp_weight = torch.where(member, (1 - 1 / n).unsqueeze(1), ones)  # (Q, C, U)
    log_comp_weight = torch.where(comp_weight > 0, comp_weight.clamp(min=1e-30).log(),
                                  torch.full_like(comp_weight, _NEG))  # (Q, C, U)
    log_comp_weight = log_comp_weight.masked_fill(~valid.unsqueeze(-1), _NEG)
    log_1m_p_hat = torch.logsumexp(lp + log_comp_weight, dim=1)  # (Q, U)
    log_odds = log_p_hat - log_1m_p_hat  # (Q, U)  Eq. 5: ℓ_k

    # Consecutive non-empty groups: move present groups to the front, keeping the grade order.
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)  # (Q, U)
    ell = log_odds.gather(1, order)  # (Q, U)
    g = levels.to(scores.dtype)[order]  # (Q, U)
    ok = present.gather(1, order)  # (Q, U)
    if U < 2:
        return scores.sum() * 0.0
    pair_ok = ok[:, :-1] & ok[:, 1:]  # (Q, U-1)
    margins = beta * (ell[:, :-1] - ell[:, 1:]) - gamma * (g[:, :-1] - g[:, 1:])  # (Q, U-1)
    terms = -F.logsigmoid(margins)  # (Q, U-1)  Eq. 6

    K = ok.sum(1)  # (Q,)
    if group_weights is None:
        w = (1.0 / (K - 1).clamp(min=1).to(terms.dtype)).unsqueeze(1).expand_as(terms)  # (Q, U-1)
    else:
        w = group_weights.to(terms.dtype)[:, : U - 1]  # (Q, U-1)
        if w.shape[1] < U - 1:
            w = F.pad(w, (0, U - 1 - w.shape[1]))
    per_query = (terms * w * pair_ok).sum(1)  # (Q,)
    has_pair = K >= 2  # (Q,)
    if not has_pair.any():
        return scores.sum() * 0.0
    return per_query[has_pair].mean()
