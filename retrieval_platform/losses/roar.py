"""Stage 2: ROAR, Relative Odds Alignment for Retrieval (METHOD.md Eq. 4–7).

Row i of ``scores`` is query i's similarity to every candidate of the batch (all workers). Query
i's graded candidates form groups by grade, G_{i,1} ≻ G_{i,2} ≻ … ≻ G_{i,K_i} (empty groups
dropped; K_i and the group sizes vary between queries):

    (4) p_ij = softmax_j( S_ij / τ_a )                over the whole row (all present entries)
    (5) P̂_{i,k} = (1/|G_{i,k}|) Σ_{j ∈ G_{i,k}} p_ij,     ℓ_{i,k} = log P̂ − log(1 − P̂)
    (6) L_align = −(1/C) Σ_i Σ_{k=1}^{K_i−1} log σ( ℓ_{i,k} − ℓ_{i,k+1} − γ (g_{i,k} − g_{i,k+1}) )
        C = the number of adjacent group pairs in the batch (C = 0 gives 0)
    (7) L₂ = L₁ + β · L_align                          (β = 0.1, τ_a = 0.01, γ = 0 in the paper)

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
) -> torch.Tensor:
    """L_align of Eq. 4–6 (METHOD.md).

    Args:
        scores: (Q, N) cosine similarities S_i of each query to every candidate of the batch.
        grades: (Q, N) grade values, higher is better; equal values form one group.
        graded: (Q, N) bool, the entries in query i's groups.
        tau: τ_a of Eq. 4.
        gamma: γ of Eq. 6, a margin per grade step (0 in the paper).
        present: (Q, N) bool or None (= all): the entries in row i's softmax (padding is not
            present). Graded entries are always present.
    """
    with torch.autocast(scores.device.type, enabled=False):
        return _roar_fp32(scores.float(), grades.float(), graded.bool(), tau, gamma,
                          None if present is None else present.bool())


def _roar_fp32(scores: torch.Tensor, grades: torch.Tensor, graded: torch.Tensor, tau: float,
               gamma: float, present: torch.Tensor | None) -> torch.Tensor:
    present = graded | (torch.ones_like(graded) if present is None else present)  # (Q, N)
    logits = (scores / tau).masked_fill(~present, _NEG)  # (Q, N)
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (Q, N)  Eq. 4

    levels = torch.unique(grades[graded]).flip(0)  # (U,) best first
    U = levels.numel()
    if U < 2:
        return scores.sum() * 0.0
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
    g = levels.to(scores.dtype)[order]  # (Q, U)
    ok = nonempty.gather(1, order)  # (Q, U)
    pair_ok = ok[:, :-1] & ok[:, 1:]  # (Q, U-1)
    margins = (ell[:, :-1] - ell[:, 1:]) - gamma * (g[:, :-1] - g[:, 1:])  # (Q, U-1)  Δ − γΔg
    terms = -F.logsigmoid(margins) * pair_ok  # (Q, U-1)  Eq. 6
    C = pair_ok.sum()
    if C == 0:
        return scores.sum() * 0.0
    return terms.sum() / C


def roar_objective(contrastive: torch.Tensor, align: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Eq. 7: L₂ = L₁ + β · L_align (the contrastive loss stays the main term)."""
    return contrastive + beta * align
