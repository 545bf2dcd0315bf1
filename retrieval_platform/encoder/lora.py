"""LoRA adapters for decoder backbones (Hu et al., 2022), through ``peft``, as the paper trains
(rank 32, alpha 64, dropout 0.1 on the attention and MLP projections).

Only the adapters train; a saved model folder always holds the merged weights, so it stays a
plain Hugging Face / sentence-transformers folder that needs no ``peft`` to load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

# Llama / Qwen / SmolLM2 names: attention q, k, v, o and the MLP's gate, up, down projections.
DECODER_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"]


@dataclass
class LoraSettings:
    rank: int = 32
    alpha: int = 64
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(DECODER_PROJECTIONS))

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora: rank >= 1, alpha > 0 and 0 <= dropout < 1")


def add_lora(backbone: nn.Module, settings: LoraSettings) -> nn.Module:
    """The backbone wrapped with fresh adapters (B = 0: the same function at step 0); only the
    adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=settings.target_modules,
                        bias="none")
    return get_peft_model(backbone, config)


def merged(backbone: nn.Module) -> nn.Module:
    """A plain module with the adapters folded into the weights (a copy: training goes on with
    the adapters); the backbone itself when it has none."""
    if not hasattr(backbone, "merge_and_unload"):
        return backbone
    return copy.deepcopy(backbone).merge_and_unload()
