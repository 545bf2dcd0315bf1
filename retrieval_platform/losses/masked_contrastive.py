"""Stage 1: in-batch contrastive loss with a false-negative margin mask (METHOD.md Eq. 1–3).

    (1) z_ij = s(q_i, c_j) / τ
    (2) for j that is not q_i's own positive, drop c_j from q_i's softmax when any of
          margin rule:  sg[s(q_i, c_j)] > sg[s(q_i, p_i)] + m
          catalog rule: c_j is in the variant group of p_i        (``same_group``)
          label rule:   c_j is a labelled positive of q_i         (``known_positive``)
        The own positive is never masked, and with ``labelled`` (stage 2) neither is a product
        judged for q_i: a labelled product is never an unlabelled positive.
    (3) L₁ = −(1/B) Σ_i log( exp(z_ii) / (exp(z_ii) + Σ_{j ≠ i, unmasked} exp(z_ij)) )

The margin rule drops only candidates that score clearly ABOVE the labelled positive: such a
candidate is more likely an unlabelled positive (a false negative) than a negative. Candidates
below that line stay, however close to the positive: they are the hard negatives the loss learns
from. Masked logits are set to −∞, so they get no gradient.

Scores and the softmax are computed in float32 whatever the caller's autocast: with τ = 0.02 a
bf16 score (resolution 0.004 near 0.9) would move a logit by 0.2.

Reference: InfoNCE / in-batch negatives (van den Oord et al., 2018; Karpukhin et al., 2020, DPR);
the margin rule is the false-negative filter of Qwen3-Embedding (Zhang et al., 2025), which the
paper (Flipkart, 2026) fine-tunes; the catalog and label rules are ours.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ContrastiveLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar L₁ (first item, so ``out[0]`` is the loss)
    masked_fraction: torch.Tensor  # share of off-positive logits removed by the mask
    margin_masked_fraction: torch.Tensor  # share removed by the margin rule
    known_masked_fraction: torch.Tensor  # share removed by the catalog and label rules
    # Share of queries whose positive outscores every candidate that is not a known duplicate
    # or positive (the margin rule is left out: it masks whatever outscores the positive).
    accuracy: torch.Tensor


def masked_contrastive_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    positive: torch.Tensor,
    *,
    tau: float,
    margin: float | None,
    same_group: torch.Tensor | None = None,
    known_positive: torch.Tensor | None = None,
    labelled: torch.Tensor | None = None,
) -> ContrastiveLossOutput:
    """Eq. 1–3 of METHOD.md.

    Args:
        q: (B, D) unit query vectors.
        c: (N, D) unit candidate vectors (all positives and hard negatives of the batch, gathered
            across workers under data parallelism).
        positive: (B,) index into ``c`` of each query's own positive.
        tau: temperature τ.
        margin: m of the margin rule; None disables the rule.
        same_group: optional (B, N) bool, c_j in the variant group of p_i (catalog rule).
        known_positive: optional (B, N) bool, c_j a labelled positive of q_i (label rule).
        labelled: optional (B, N) bool, c_j judged for q_i: exempt from the margin rule (a
            judged low-grade product that outscores the positive is a hard negative to learn
            from, not a false negative).
    """
    B, N = q.shape[0], c.shape[0]
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ c.float().T  # (B, N)
    own = F.one_hot(positive, N).bool()  # (B, N)
    with torch.no_grad():  # sg[·]: the mask is a decision, not a function to differentiate
        pos_scores = scores.gather(1, positive[:, None])  # (B, 1)
        margin_mask = (
            scores > pos_scores + margin if margin is not None else torch.zeros_like(own)
        )  # (B, N)
        known = torch.zeros_like(own)
        if same_group is not None:
            known |= same_group
        if known_positive is not None:
            known |= known_positive
        known &= ~own
        margin_mask &= ~own
        if labelled is not None:
            margin_mask &= ~labelled
        mask = margin_mask | known
        accuracy = (scores.masked_fill(known, float("-inf")).argmax(dim=1) == positive).float()
    logits = (scores / tau).masked_fill(mask, float("-inf"))  # (B, N)
    loss = F.cross_entropy(logits, positive)
    off_positive = max(B * (N - 1), 1)
    return ContrastiveLossOutput(
        loss=loss,
        masked_fraction=mask.sum() / off_positive,
        margin_masked_fraction=margin_mask.sum() / off_positive,
        known_masked_fraction=known.sum() / off_positive,
        accuracy=accuracy.mean(),
    )
