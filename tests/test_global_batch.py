"""Two data-parallel workers learn like one batch of the same size (METHOD.md "How we implement
the global batch"): the DDP-averaged gradient of ``global_contrastive_loss`` over two gloo
processes equals the single-process gradient of the whole batch, including the gradient that
each worker's candidates get from the other worker's queries."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrieval_platform.config import from_dict
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.objectives import global_contrastive_loss

B, H, D_IN, D = 3, 1, 8, 4  # per worker: 3 pairs with 1 negative each


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D, D_IN, generator=g)
    xq = torch.randn(2 * B, D_IN, generator=g)  # both workers' queries
    xc = torch.randn(2 * B * (1 + H), D_IN, generator=g)  # per worker: B positives, B·H negatives
    keys = torch.arange(2 * B * (1 + H))
    return weight, xq, xc, keys


def _encode(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x @ weight.T, dim=-1)


def _cfg() -> TrainConfig:
    return from_dict(TrainConfig, {"loss": {"tau": 0.1, "margin": 0.1}})


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    weight, xq, xc, keys = _inputs()
    weight.requires_grad_(True)
    n = B * (1 + H)
    q = _encode(weight, xq[rank * B:(rank + 1) * B])
    c = _encode(weight, xc[rank * n:(rank + 1) * n])
    k = keys[rank * n:(rank + 1) * n]
    loss, out = global_contrastive_loss(q, c, k, k, [[]] * B, _cfg())
    loss.backward()
    dist.all_reduce(weight.grad)  # what DDP does: the mean of the workers' gradients
    weight.grad /= 2
    queue.put((rank, weight.grad.clone(), out.loss.item()))
    dist.destroy_process_group()


def test_two_workers_learn_like_one_batch():
    weight, xq, xc, keys = _inputs()
    weight.requires_grad_(True)
    loss, out = global_contrastive_loss(_encode(weight, xq), _encode(weight, xc)[_one_order()],
                                        keys[_one_order()], keys[_one_order()], [[]] * (2 * B),
                                        _cfg())
    loss.backward()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for _, grad, worker_loss in results:
        torch.testing.assert_close(worker_loss, out.loss.item(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, weight.grad, atol=1e-5, rtol=1e-4)


def _one_order() -> torch.Tensor:
    """The single process takes the same candidates with all positives first (worker 0's, then
    worker 1's), then all negatives: the softmax is over the same set."""
    n = B * (1 + H)
    first = [*range(B), *range(n, n + B)]
    return torch.tensor(first + [i for i in range(2 * n) if i not in first])


def test_matryoshka_sums_the_loss_over_the_first_dimensions():
    """loss.matryoshka_dims = [2]: L = L₁(full) + L₁(first 2 dims, renormalised)."""
    from retrieval_platform.encoder.model import truncate
    from retrieval_platform.losses import masked_contrastive_loss

    weight, xq, xc, keys = _inputs()
    q, c = _encode(weight, xq), _encode(weight, xc)[_one_order()]
    cfg = _cfg()
    cfg.loss.matryoshka_dims = [2, 64]  # 64 >= D: ignored
    loss, out = global_contrastive_loss(q, c, keys, keys, [[]] * (2 * B), cfg)
    positive = torch.arange(2 * B)
    expected = sum(masked_contrastive_loss(truncate(q, d), truncate(c, d), positive, tau=0.1,
                                           margin=0.1).loss for d in (None, 2))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(out.loss, masked_contrastive_loss(q, c, positive, tau=0.1,
                                                                 margin=0.1).loss)
