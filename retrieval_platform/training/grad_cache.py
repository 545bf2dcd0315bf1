"""A step's forward and backward, with or without gradient caching.

In-batch contrastive learning wants big batches (METHOD.md: the paper's stage 1 uses 8,192
pairs) and a batch's activations grow with it. Gradient caching (Gao et al., 2021, "Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup") makes the memory one chunk's:

1. embed every text without a graph, in chunks (the length buckets), keeping each chunk's
   random state (dropout);
2. compute the loss on the whole batch from those embeddings, as leaves, and back-propagate to
   them only: ``g = ∂L/∂e``, one vector a text;
3. embed each chunk again with a graph under its saved random state (the same dropout masks, so
   the same embeddings) and back-propagate ``Σ e · g``: its parameter gradient is the chunk's
   share of ``∂L/∂θ`` by the chain rule, and the chunks' shares add up to it.

The loss and the gradients equal the uncached step's up to floating point (tests/
test_grad_cache.py checks it on a tiny model with dropout), at the cost of a second forward pass.
Under DDP every chunk but the last back-propagates inside ``no_sync()``: the workers' gradients
are averaged once a step, as without the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from retrieval_platform.encoder.model import DualEncoder, length_chunks
from retrieval_platform.training.objectives import Metrics, Objective

Precision = Callable[[], contextlib.AbstractContextManager]  # the forward passes' autocast


def _embed(model: DualEncoder, forward: Any, texts: list[str], kind: str) -> torch.Tensor:
    device = next(model.parameters()).device
    return forward(**{k: v.to(device) for k, v in model.tokenize(texts, kind).items()})


def _chunks(texts: list[str], bucket: int) -> list[list[int]]:
    """Indices of each forward pass: by length, ``bucket`` at a time; 0 or few texts: one."""
    if not bucket or len(texts) <= bucket:
        return [list(range(len(texts)))]
    return length_chunks(texts, bucket)


def _in_order(parts: list[torch.Tensor], chunks: list[list[int]], n: int) -> torch.Tensor:
    """The chunks' rows put back in the texts' order: (n, D)."""
    device = parts[0].device
    inverse = torch.empty(n, dtype=torch.long, device=device)
    inverse[torch.tensor([i for idx in chunks for i in idx], device=device)] = torch.arange(
        n, device=device)
    return torch.cat(parts)[inverse]  # (n, D)


def embed_bucketed(model: DualEncoder, forward: Any, texts: list[str], kind: str,
                   bucket: int) -> torch.Tensor:
    """(N, D) embeddings with gradients, in ``texts``' order: the texts sorted by length and
    embedded ``bucket`` at a time, each chunk padded only to its own longest text. The vectors
    (and so the loss) equal one padded pass's; the padding, most of a batch of short product
    titles next to a few long ones, is not computed. ``bucket`` 0: one pass."""
    chunks = _chunks(texts, bucket)
    if len(chunks) == 1:
        return _embed(model, forward, texts, kind)  # (N, D)
    parts = [_embed(model, forward, [texts[i] for i in idx], kind) for idx in chunks]
    return _in_order(parts, chunks, len(texts))


def loss_with_graph(model: DualEncoder, forward: Any, objective: Objective, bucket: int,
                    autocast: Precision = contextlib.nullcontext,
                    ) -> tuple[torch.Tensor, Metrics]:
    """The objective's loss, its graph over the whole batch. ``autocast``: the forward passes'
    precision context."""
    with autocast():
        embeddings = [embed_bucketed(model, forward, texts, kind, bucket)
                      for texts, kind in objective.texts]
        return objective.loss_on(embeddings)


def backward(model: DualEncoder, forward: Any, objective: Objective, bucket: int,
             autocast: Precision = contextlib.nullcontext,
             ) -> tuple[torch.Tensor, Metrics]:
    """The objective's loss with ``.backward()`` done (outside ``autocast``): one graph."""
    loss, metrics = loss_with_graph(model, forward, objective, bucket, autocast)
    loss.backward()
    return loss.detach(), metrics


class _RandomState:
    """The generators dropout draws from (CPU, and the model's GPU), to replay a chunk."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.gpu is not None:
            torch.cuda.set_rng_state(self.gpu, self.device)


def cached_backward(model: DualEncoder, forward: Any, objective: Objective, bucket: int,
                    autocast: Precision = contextlib.nullcontext,
                    ) -> tuple[torch.Tensor, Metrics]:
    """The objective's loss with its gradients accumulated, one chunk's graph at a time (the
    module docstring's three steps). ``bucket``: texts a chunk (0: one chunk per kind)."""
    device = next(model.parameters()).device
    pieces: list[tuple[int, list[int], _RandomState]] = []  # (which texts, rows, state)
    leaves = []
    with torch.no_grad(), autocast():  # 1. every embedding, no graph
        for n, (texts, kind) in enumerate(objective.texts):
            chunks = _chunks(texts, bucket)
            parts = []
            for idx in chunks:
                pieces.append((n, idx, _RandomState(device)))
                parts.append(_embed(model, forward, [texts[i] for i in idx], kind))
            leaves.append(_in_order(parts, chunks, len(texts)).float().requires_grad_())
    with autocast():
        loss, metrics = objective.loss_on(leaves)  # 2. the whole batch's loss, to the embeddings
    loss.backward()
    after = _RandomState(device)
    no_sync = getattr(forward, "no_sync", contextlib.nullcontext)  # DDP: average once a step
    for m, (n, idx, state) in enumerate(pieces):  # 3. each chunk again, with its graph
        texts, kind = objective.texts[n]
        if leaves[n].grad is None:  # the loss does not depend on these texts
            continue
        state.restore()
        with no_sync() if m < len(pieces) - 1 else contextlib.nullcontext():
            with autocast():
                e = _embed(model, forward, [texts[i] for i in idx], kind)  # (chunk, D)
            grad = leaves[n].grad[torch.tensor(idx, device=device)]  # (chunk, D)
            (e.float() * grad).sum().backward()
    after.restore()  # the random stream goes on as after one uncached step
    return loss.detach(), metrics
