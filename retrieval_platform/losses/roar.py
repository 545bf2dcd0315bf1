"""Stage 2: ROAR, Relative Odds Alignment for Retrieval (METHOD.md Eq. 4–7).

Row i of ``scores`` is query i's similarity to every candidate of the batch (all workers). Query
i's graded candidates form groups by grade, G_{i,1} ≻ G_{i,2} ≻ … ≻ G_{i,K_i} (empty groups
dropped; K_i and the group sizes vary between queries):

    (4) p_ij = softmax_j( S_ij / τ_a )                over the whole row (all present entries)
    (5) P̂_{i,k} = (1/|G_{i,k}|) Σ_{j ∈ G_{i,k}} p_ij,     ℓ_{i,k} = log P̂ − log(1 − P̂)
    (6) L_align = −(1/C) Σ_i Σ_{k=1}^{K_i−1} log σ( ℓ_{i,k} − ℓ_{i,k+1} − γ (g_{i,k} − g_{i,k+1}) )
        C = the number of adjacent group pairs in the batch (C = 0 gives 0)
    (7) L₂ = L₁ + β · L_align                          (β = 0.1, τ_a = 0.01, γ = 0 in the paper)

``pairing="products"`` is Eq. 5'/6', the paper's Δ read literally on product pairs: for each
adjacent pair of non-empty groups and each a ∈ G_{i,k}, b ∈ G_{i,k+1},

    (5') ℓ_ia = log p_ia − log(1 − p_ia)
    (6') L_align = −(1/C') Σ log σ( ℓ_ia − ℓ_ib − γ (g_a − g_b) ),  C' = the batch's such pairs

With one product a group the two forms are the same. At τ_a = 0.01 a group's mean probability
is its top-scored member's, so the group-mean form orders group maxima; the product form gives
every misordered pair its gradient.

It extends Bradley–Terry (Bradley & Terry, 1952; as a preference loss: Rafailov et al., 2023,
DPO; odds ratios: Hong et al., 2024, ORPO) from pairs to variable-sized graded groups: with one
product per group and small probabilities the normaliser cancels, ℓ_a − ℓ_b ≈ (s_a − s_b)/τ_a,
and each term is the Bradley–Terry loss −log σ(r_a − r_b) on rewards r = s/τ_a.

Numerics: log(1 − P̂) is the log of the complement mass,
    1 − P̂_{i,k} = Σ_{j ∉ G_{i,k}} p_ij + (1 − 1/|G_{i,k}|) Σ_{j ∈ G_{i,k}} p_ij,
with one logsumexp: exactly log1mexp(log P̂), but at full precision when P̂ → 1 (a float32
log1mexp returns −∞ there at τ_a = 0.01 and scores of ±1). Everything runs in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

_NEG = -1e9  # "minus infinity" that keeps logsumexp and its gradient finite on empty rows


def roar_loss(
    scores: torch.Tensor,
    grades: torch.Tensor,
    graded: torch.Tensor,
    *,
    tau: float,
    gamma: float = 0.0,
    present: torch.Tensor | None = None,
    pairing: Literal["group_mean", "products"] = "group_mean",
) -> torch.Tensor:
    """L_align of Eq. 4–6 (METHOD.md), or of Eq. 4, 5', 6' with ``pairing="products"``.

    Args:
        scores: (Q, N) cosine similarities S_i of each query to every candidate of the batch.
        grades: (Q, N) grade values, higher is better; equal values form one group.
        graded: (Q, N) bool, the entries in query i's groups.
        tau: τ_a of Eq. 4.
        gamma: γ of Eq. 6, a margin per grade step (0 in the paper).
        present: (Q, N) bool or None (= all): the entries in row i's softmax (padding is not
            present). Graded entries are always present.
        pairing: ``"group_mean"`` (Eq. 5–6: adjacent groups' mean probabilities) or
            ``"products"`` (Eq. 5'/6': every product pair of adjacent groups).
    """
    if pairing not in ("group_mean", "products"):
        raise ValueError(f"pairing {pairing!r}: 'group_mean' or 'products'")
    with torch.autocast(scores.device.type, enabled=False):
        scores, grades, graded = scores.float(), grades.float(), graded.bool()
        present = graded | (torch.ones_like(graded) if present is None else present.bool())
        logits = (scores / tau).masked_fill(~present, _NEG)  # (Q, N)
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (Q, N)  Eq. 4
        pairs = _product_pairs if pairing == "products" else _group_mean_pairs
        return pairs(logp, grades, graded, present, gamma)


def _group_mean_pairs(logp: torch.Tensor, grades: torch.Tensor, graded: torch.Tensor,
                      present: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 5–6 on the row log-probabilities ``logp`` (Q, N)."""
    levels = torch.unique(grades[graded]).flip(0)  # (U,) best first
    U = levels.numel()
    if U < 2:
        return logp.sum() * 0.0
    member = (grades.unsqueeze(-1) == levels) & graded.unsqueeze(-1)  # (Q, N, U)
    size = member.sum(1)  # (Q, U)
    n = size.clamp(min=1).to(logp.dtype)  # (Q, U)

    lp = logp.unsqueeze(-1)  # (Q, N, 1)
    log_mass = torch.logsumexp(lp.masked_fill(~member, _NEG), dim=1)  # (Q, U)  log Σ_G p
    log_p_hat = log_mass - n.log()  # (Q, U)  Eq. 5: log P̂
    # log(1 − P̂): members weighted by (1 − 1/|G|), every other present entry by 1.
    comp_weight = torch.where(member, (1 - 1 / n).unsqueeze(1), 1.0)  # (Q, N, U)
    log_comp_weight = torch.where(comp_weight > 0, comp_weight.clamp(min=1e-30).log(), _NEG)
    log_comp_weight = log_comp_weight.masked_fill(~present.unsqueeze(-1), _NEG)  # (Q, N, U)
    log_1m_p_hat = torch.logsumexp(lp + log_comp_weight, dim=1)  # (Q, U)
    log_odds = log_p_hat - log_1m_p_hat  # (Q, U)  Eq. 5: ℓ

    # Adjacent non-empty groups: move present groups to the front, keeping the grade order.
    nonempty = size > 0  # (Q, U)
    order = torch.argsort((~nonempty).to(torch.int8), dim=1, stable=True)  # (Q, U)
    ell = log_odds.gather(1, order)  # (Q, U)
    g = levels.to(logp.dtype)[order]  # (Q, U)
    ok = nonempty.gather(1, order)  # (Q, U)
    pair_ok = ok[:, :-1] & ok[:, 1:]  # (Q, U-1)
    margins = (ell[:, :-1] - ell[:, 1:]) - gamma * (g[:, :-1] - g[:, 1:])  # (Q, U-1)  Δ − γΔg
    terms = -F.logsigmoid(margins) * pair_ok  # (Q, U-1)  Eq. 6
    C = pair_ok.sum()
    if C == 0:
        return logp.sum() * 0.0
    return terms.sum() / C


def _product_pairs(logp: torch.Tensor, grades: torch.Tensor, graded: torch.Tensor,
                   present: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 5'/6' on the row log-probabilities ``logp`` (Q, N): each row's graded entries are
    moved to the front (M of them at most), so the pair tensors are (Q, M, M), not (Q, N, N)."""
    N = logp.shape[1]
    M = int(graded.sum(1).max()) if graded.numel() else 0
    if M < 2:
        return logp.sum() * 0.0
    cols = torch.argsort((~graded).to(torch.int8), dim=1, stable=True)[:, :M]  # (Q, M)
    valid = graded.gather(1, cols)  # (Q, M)
    lp = logp.gather(1, cols)  # (Q, M)
    g = grades.gather(1, cols)  # (Q, M)
    # Eq. 5': log(1 − p_ia) as the log of the row's other present mass (exact where p → 1).
    others = present.unsqueeze(1) & (torch.arange(N, device=logp.device) != cols.unsqueeze(-1))
    log_1m_p = torch.logsumexp(logp.unsqueeze(1).masked_fill(~others, _NEG), dim=2)  # (Q, M)
    ell = lp - log_1m_p  # (Q, M)

    # A product's group rank among its query's non-empty groups (0 = best): adjacent groups
    # are ranks k and k + 1, whatever grades lie empty between them.
    levels = torch.unique(g[valid]).flip(0)  # (U,) best first
    member = (g.unsqueeze(-1) == levels) & valid.unsqueeze(-1)  # (Q, M, U)
    level_rank = member.any(1).cumsum(1) - 1  # (Q, U)
    rank = level_rank.gather(1, member.to(torch.int8).argmax(-1))  # (Q, M)
    pair = (valid.unsqueeze(2) & valid.unsqueeze(1)
            & (rank.unsqueeze(1) == rank.unsqueeze(2) + 1))  # (Q, M, M)  a ≻ b, adjacent
    margins = (ell.unsqueeze(2) - ell.unsqueeze(1)
               - gamma * (g.unsqueeze(2) - g.unsqueeze(1)))  # (Q, M, M)  Δ_iab − γΔg
    C = pair.sum()
    if C == 0:
        return logp.sum() * 0.0
    return (-F.logsigmoid(margins) * pair).sum() / C  # Eq. 6'


def roar_objective(contrastive: torch.Tensor, align: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Eq. 7: L₂ = L₁ + β · L_align (the contrastive loss stays the main term)."""
    return contrastive + beta * align
