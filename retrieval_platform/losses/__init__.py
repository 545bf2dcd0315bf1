"""Training losses, one per file, as pure functions on embeddings (METHOD.md Eq. 1–7, and the
distillation term stage 2 may add)."""

from retrieval_platform.losses.listwise_distillation import listwise_distillation_loss
from retrieval_platform.losses.masked_contrastive import (
    ContrastiveLossOutput,
    masked_contrastive_loss,
)
from retrieval_platform.losses.roar import roar_loss, roar_objective

__all__ = ["ContrastiveLossOutput", "listwise_distillation_loss", "masked_contrastive_loss",
           "roar_loss", "roar_objective"]
