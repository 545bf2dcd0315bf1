"""Stage-1 training throughput: Ray Train with N workers vs a plain single-process PyTorch loop,
same model, data, global batch and loss, measured in one run on this machine.

    python bench/train_throughput.py [--backbone minilm-l6] [--steps 20] [--global-batch 32]

Both run 2·steps steps and measure samples/s (pairs per second) over the last ``steps`` (the
first half warms up); the Ray run's wall time including startup is reported separately.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _setup import local_ray, synthetic_catalog

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import from_dict
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.examples import contrastive_examples
from retrieval_platform.training.loop import _columns, _load_init, contrastive_step, lr_at
from retrieval_platform.training.trainer import train


def plain_loop(cfg: TrainConfig, examples, global_batch: int, steps: int, warmup: int,
               threads: int) -> float:
    """The same step in one process: samples/s over the steps after the warm-up."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _load_init(cfg.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    model.train()
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        lo = (step * global_batch) % max(1, examples.num_rows - global_batch)
        batch = _columns(examples.slice(lo, global_batch))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, _ = contrastive_step(model, model, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * global_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    cpus = local_ray()
    tmp = synthetic_catalog(3000, "train-bench-")
    per_worker = args.global_batch // args.workers
    cfg = from_dict(TrainConfig, {
        "model": {"init": args.backbone, "max_query_length": 32, "max_product_length": 64},
        "data": {"prepared_dir": f"{tmp}/data", "hard_negatives": 1},
        "optim": {"max_steps": 2 * args.steps, "batch_size": per_worker,
                  "warmup_steps": 2},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": cpus / args.workers},
        "run": {"name": "bench", "storage_path": f"{tmp}/runs", "log_every": args.steps,
                "checkpoint_every": 10**9, "max_failures": 0},
        "output_dir": f"{tmp}/model",
    })
    examples = contrastive_examples(PreparedDataset(f"{tmp}/data"), hard_negatives=1)

    started = time.perf_counter()
    result = train(cfg)
    ray_wall = time.perf_counter() - started
    # Reports come every `steps` steps; the last one's window is the second half.
    ray_sps = result.metrics["samples_per_s"]
    plain_sps = plain_loop(cfg, examples, args.global_batch, args.steps, args.steps, cpus)
    out = {
        "backbone": args.backbone, "cpus": cpus, "global_batch": args.global_batch,
        "workers": args.workers, "steps_measured": args.steps,
        "ray_train_samples_per_s": round(ray_sps, 2),
        "plain_pytorch_samples_per_s": round(plain_sps, 2),
        "ratio_ray_over_plain": round(ray_sps / plain_sps, 3),
        "ray_train_wall_s_incl_startup": round(ray_wall, 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
