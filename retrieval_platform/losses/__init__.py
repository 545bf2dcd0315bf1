"""Training losses, one per file, as pure functions on embeddings (METHOD.md Eq. 1–7)."""

from retrieval_platform.losses.masked_contrastive import (
    ContrastiveLossOutput,
    masked_contrastive_loss,
)
from retrieval_platform.losses.roar import roar_loss, roar_objective

__all__ = ["ContrastiveLossOutput", "masked_contrastive_loss", "roar_loss", "roar_objective"]
