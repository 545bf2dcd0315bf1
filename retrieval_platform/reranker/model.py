"""The cross-encoder reranker: query and product text in one sequence, a score head.

    s(q, d) = w · h_[CLS](backbone([q ; d])) + b          (encoders: BERT's pooled first token)
    s(q, d) = w · h_last(backbone([q ; d]))                 (decoders: the last non-pad token)

It is a Hugging Face ``AutoModelForSequenceClassification`` with one label, started from a
backbone the platform ships (``minilm-l6``; ``smollm2-135m``; ``tiny`` in tests) with a fresh
head, or from a folder of ours. The product text is the rendered text the dual encoder embeds
(``prepare_catalog``), so the two stages read the same thing. ``num_layers`` keeps the first N
layers (:func:`~retrieval_platform.encoder.model.keep_layers`): a cross-encoder reads every
candidate at query time, so its depth is its latency (docs/RESULTS.md).

:meth:`CrossEncoder.score` is the one inference path (evaluation, serving); :meth:`logits` is
the same tokenisation with gradients (training). A saved folder is a plain sequence-
classification folder (``CrossEncoder(path)`` of sentence-transformers loads it as it is, with
an identity activation: its scores are ours) plus ``retrieval_platform_reranker.json`` (our
settings and the weights' checksum) and a model card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval_platform.encoder.backbones import BACKBONES, backbone_spec, save_weights
from retrieval_platform.encoder.model import (
    ModelLoadError,
    Precision,
    keep_layers,
    kept_int8,
    length_chunks,
    quiet_transformers,
    resolve_precision,
)
from retrieval_platform.io import sha256_file, write_json

RERANKER_FILE = "retrieval_platform_reranker.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class RerankerSettings:
    base: str = ""  # the backbone this model started from
    max_length: int = 96  # tokens of the (query, product) sequence; longest part cut first
    num_layers: int | None = None  # keep the backbone's first N layers (None: all)


class CrossEncoder(nn.Module):
    """Scores (query, product text) pairs with one sequence-classification backbone."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: RerankerSettings) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings
        if tokenizer.pad_token is None:  # decoders often ship without one
            tokenizer.pad_token = tokenizer.eos_token
        # decoders pool the last non-pad token: the model must know which token pads
        backbone.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.model_max_length = settings.max_length  # sentence-transformers cuts alike

    def tokenize(self, queries: list[str], products: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(queries, products, padding=True, truncation=True,
                               max_length=self.settings.max_length, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v for k, v in batch.items() if k in keep}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None,
                backbone: nn.Module | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = (backbone or self.backbone)(input_ids=input_ids, attention_mask=attention_mask,
                                          **extra)
        return out.logits[:, 0].float()  # (B,)

    def logits(self, queries: list[str], products: list[str], forward: Any = None,
               backbone: nn.Module | None = None) -> torch.Tensor:
        """(B,) scores with gradients: the training path (``forward``: the DDP-wrapped model)."""
        batch = self.tokenize(queries, products)
        device = next(self.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items()}
        if backbone is not None:
            return self(**inputs, backbone=backbone)
        return (forward or self)(**inputs)

    def int8_backbone(self) -> nn.Module:
        """A dynamically quantised int8 copy of the backbone, made once (``kept_int8``)."""
        return kept_int8(self, self.backbone)

    @torch.inference_mode()
    def score(self, queries: list[str], products: list[str], batch_size: int = 64,
              precision: Precision = "fp32") -> np.ndarray:
        """(B,) float32 scores of the pairs ``(queries[i], products[i])``: the inference path.
        Pairs are scored in chunks of similar length (less padding)."""
        if len(queries) != len(products):
            raise ValueError("score needs one query per product")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        precision = resolve_precision(precision, device.type)
        try:
            backbone = self.int8_backbone() if precision == "int8" else None
            out = np.empty(len(queries), dtype=np.float32)
            pairs = [q + " " + p for q, p in zip(queries, products, strict=True)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                for idx in length_chunks(pairs, batch_size):
                    scores = self.logits([queries[i] for i in idx], [products[i] for i in idx],
                                         backbone=backbone)
                    out[idx] = scores.float().cpu().numpy()
            return out
        finally:
            self.train(was_training)

    def rerank(self, query: str, products: list[str], batch_size: int = 64,
               precision: Precision = "fp32") -> np.ndarray:
        """(n,) scores of one query against each of ``products``."""
        return self.score([query] * len(products), products, batch_size, precision)

    # ------------------------------------------------------------------------- persistence

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        quiet_transformers()
        # sentence-transformers' CrossEncoder: raw logits (an identity), as we score
        self.backbone.config.sentence_transformers = {
            "activation_fn": "torch.nn.modules.linear.Identity"}
        save_weights(self.backbone, path)
        self.tokenizer.save_pretrained(path)
        write_json(path / RERANKER_FILE, {
            "format_version": FORMAT_VERSION, "settings": asdict(self.settings),
            "weights_sha256": sha256_file(path / WEIGHTS_FILE), "metadata": metadata or {},
        })
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **overrides: Any) -> CrossEncoder:
        """A backbone name or any Hugging Face model folder (a fresh score head on it), or a
        reranker folder of ours (checked against its checksum); ``overrides`` replace settings
        (``num_layers`` cuts the loaded model)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        if str(name_or_path) in BACKBONES:
            folder = backbone_spec(str(name_or_path)).resolve()
            settings = RerankerSettings(base=str(name_or_path))
        elif (Path(name_or_path) / RERANKER_FILE).is_file():
            folder = Path(name_or_path)
            settings = RerankerSettings(**reranker_info(folder)["settings"])
        elif (Path(name_or_path) / "config.json").is_file():  # any Hugging Face model folder
            folder = Path(name_or_path)
            settings = RerankerSettings(base=folder.name)
        else:
            raise ModelLoadError(f"{name_or_path}: not a backbone name ({', '.join(BACKBONES)}), "
                                 "a reranker folder nor a model folder")
        settings = RerankerSettings(**{**asdict(settings),
                                       **{k: v for k, v in overrides.items() if v is not None}})
        try:
            backbone = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=1, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{folder}: cannot load the model ({exc})") from None
        if settings.num_layers is not None:
            keep_layers(backbone.base_model, settings.num_layers)
        return cls(backbone, tokenizer, settings)


def reranker_info(folder: str | Path) -> dict[str, Any]:
    """What a reranker folder's ``retrieval_platform_reranker.json`` says, verified against its
    weights, plus ``model_id`` (the base and the first 12 hex digits of the weights' sha256)."""
    folder = Path(folder)
    path = folder / RERANKER_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder}: not a reranker folder written by this platform (no "
                             f"{RERANKER_FILE}; train one with train_jobs.rerank)")
    info = json.loads(path.read_text())
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{folder}: missing weights ({WEIGHTS_FILE})")
    if sha256_file(weights) != info["weights_sha256"]:
        raise ModelLoadError(f"{folder}: {WEIGHTS_FILE} does not match its recorded sha256 "
                             "(corrupted or altered)")
    info["model_id"] = f"rerank-{info['settings']['base'] or 'model'}-{info['weights_sha256'][:12]}"
    return info
