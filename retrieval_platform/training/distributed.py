"""The global batch across data-parallel workers (METHOD.md, "How we implement the global
batch"): each worker all-gathers every worker's tensors, its own slice keeping its gradient.
With one process (tests, a single worker) every function is the identity."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (sizes may differ between workers); the local slice keeps its
    gradient, the others are constants. Every worker so holds the whole global batch."""
    rank, size_of_world = world()
    if size_of_world == 1:
        return x
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(size_of_world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(size_of_world)]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[: int(n.item())] for p, n in zip(parts, sizes, strict=True)]
    parts[rank] = x
    return torch.cat(parts)


def gather_sizes(n: int, device: torch.device) -> torch.Tensor:
    """(world,) the ``n`` of every worker (its count of queries or candidates)."""
    return gather_with_grad(torch.tensor([n], device=device))


def offsets(sizes: torch.Tensor) -> torch.Tensor:
    """(world,) where each worker's rows start in the gathered tensor: exclusive cumsum."""
    return torch.cumsum(sizes, 0) - sizes


def padded(rows: list[list[int]], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged int lists as (len(rows), longest) values and a validity mask."""
    width = max((len(r) for r in rows), default=0) or 1
    values = torch.full((len(rows), width), fill, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return values, valid


def gather_rows(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Every worker's per-query key lists, as one padded (B_all, P) tensor (−1 = padding)."""
    values, valid = padded(rows)
    values = values.masked_fill(~valid, -1).to(device)  # NCCL gathers device tensors only
    _, size_of_world = world()
    if size_of_world > 1:  # widths differ between workers: pad to the widest first
        width = torch.tensor([values.shape[1]], device=device)
        widths = [torch.zeros_like(width) for _ in range(size_of_world)]
        dist.all_gather(widths, width)
        widest = int(max(w.item() for w in widths))
        values = torch.nn.functional.pad(values, (0, widest - values.shape[1]), value=-1)
    return gather_with_grad(values)
