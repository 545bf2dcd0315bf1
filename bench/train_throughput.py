"""Stage-1 training throughput, measured in one run on this machine, same model, data, global
batch and loss (``--negatives`` mined-style negatives per pair):

- Ray Train, ``--workers`` DDP workers with one CPU each, fp32, one padded forward pass per
  kind of text (the layout before length bucketing);
- the same with length-bucketed forward passes (``optim.length_bucket``);
- the same with bf16 autocast (``optim.precision: auto`` resolves to it where the CPU has
  AVX512-BF16 or AMX; elsewhere the row is skipped: emulated bf16 is much slower);
- Ray Train, one worker holding every core (no gradient all-reduce between processes);
- a plain single-process PyTorch loop, fp32.

With ``--lora``, instead: full fine-tuning against LoRA adapters (rank 32, alpha 64, dropout
0.1, the paper's), both through Ray Train with the fastest recipe above (bucketed, precision
auto), optionally with the backbone cut to ``--num-layers``.

    python bench/train_throughput.py [--backbone minilm-l6] [--steps 20] [--global-batch 64]
        [--prepared runs/data/homedepot]   (default: a generated 3,000-product catalog)
        [--lora] [--num-layers N]

Each runs 2·steps steps and measures samples/s (pairs per second) over the last ``steps`` (the
first half warms up); ratios are to the first row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _setup import local_ray, synthetic_catalog

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.config import from_dict, to_dict
from retrieval_platform.encoder.lora import LoraSettings
from retrieval_platform.encoder.model import resolve_precision
from retrieval_platform.training.config import TrainConfig
from retrieval_platform.training.examples import contrastive_examples, sample_negatives
from retrieval_platform.training.grad_cache import backward, cached_backward
from retrieval_platform.training.loop import batch_columns, load_init, lr_at
from retrieval_platform.training.objectives import stage1_objective
from retrieval_platform.training.trainer import train


def plain_loop(cfg: TrainConfig, examples, global_batch: int, steps: int, warmup: int,
               threads: int, precision: str = "fp32") -> float:
    """The same step in one process: samples/s over the steps after the warm-up."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_init(cfg.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    model.train()
    return step_loop(model, opt, cfg, examples, global_batch, steps, warmup, precision)


def step_loop(model, opt, cfg: TrainConfig, examples, global_batch: int, steps: int,
              warmup: int, precision: str = "fp32") -> float:
    """Stage-1 steps of the training loop's own step (``optim.grad_cache`` picks the cached
    one) on slices of ``examples``: pairs/s over the steps after the warm-up."""
    run = cached_backward if cfg.optim.grad_cache else backward
    rng = np.random.default_rng(0)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        lo = (step * global_batch) % max(1, examples.num_rows - global_batch)
        batch = sample_negatives(batch_columns(examples.slice(lo, global_batch)),
                                 cfg.data.hard_negatives, rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        run(model, model, stage1_objective(batch, cfg), cfg.optim.length_bucket,
            lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"))
        opt.step()
    return steps * global_batch / (time.perf_counter() - start)


def ray_train(base: TrainConfig, workers: int, cpus: int, global_batch: int,
              bucket: int = 0, precision: str = "fp32", lora: bool = False) -> float:
    cfg = from_dict(TrainConfig, to_dict(base))
    cfg.optim.length_bucket, cfg.optim.precision = bucket, precision
    cfg.model.lora = LoraSettings() if lora else None
    cfg.optim.batch_size = global_batch // workers
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = workers, cpus / workers
    cfg.run.name = f"bench-{workers}w-{bucket}-{precision}-{'lora' if lora else 'full'}"
    return train(cfg).metrics["samples_per_s"]  # the last report: the second half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--prepared", help="a prepared dataset (default: a generated one)")
    parser.add_argument("--lora", action="store_true", help="full fine-tuning vs LoRA")
    parser.add_argument("--num-layers", type=int, help="cut the backbone after N layers")
    parser.add_argument("--json")
    args = parser.parse_args()
    cpus = local_ray()
    tmp = synthetic_catalog(3000, "train-bench-")
    prepared = args.prepared or f"{tmp}/data"
    cfg = from_dict(TrainConfig, {
        "model": {"init": args.backbone, "max_query_length": 24, "max_product_length": 48,
                  "num_layers": args.num_layers},
        "data": {"prepared_dir": prepared, "hard_negatives": args.negatives},
        "optim": {"max_steps": 2 * args.steps, "warmup_steps": 2, "length_bucket": 0},
        "run": {"storage_path": f"{tmp}/runs", "log_every": args.steps,
                "checkpoint_every": 10**9, "max_failures": 0},
        "output_dir": f"{tmp}/model",
    })
    examples = contrastive_examples(PreparedDataset(prepared), hard_negatives=args.negatives)
    w, gb = args.workers, args.global_batch
    runs = {
        f"ray_train_{w}x1cpu_full": lambda: ray_train(cfg, w, cpus, gb, 32, "auto"),
        f"ray_train_{w}x1cpu_lora": lambda: ray_train(cfg, w, cpus, gb, 32, "auto", lora=True),
    } if args.lora else {
        f"ray_train_{w}x1cpu_fp32": lambda: ray_train(cfg, w, cpus, gb),
        f"ray_train_{w}x1cpu_fp32_bucketed": lambda: ray_train(cfg, w, cpus, gb, 32),
    }
    # emulated bf16 is much slower: not measured
    if resolve_precision("auto") == "bf16" and not args.lora:
        runs[f"ray_train_{w}x1cpu_bf16_bucketed"] = lambda: ray_train(cfg, w, cpus, gb, 32,
                                                                      "bf16")
    runs |= {} if args.lora else {
        f"ray_train_1x{cpus}cpu_fp32": lambda: ray_train(cfg, 1, cpus, gb),
        f"plain_{cpus}threads_fp32": lambda: plain_loop(cfg, examples, gb, args.steps,
                                                        args.steps, cpus),
    }
    rows = {}
    for name, run in runs.items():
        rows[name] = run()
        print(f"{name}: {rows[name]:.2f} pairs/s", flush=True)
    first = next(iter(rows.values()))
    out = {
        "backbone": args.backbone, "num_layers": args.num_layers, "cpus": cpus,
        "precision": resolve_precision("auto"), "global_batch": args.global_batch,
        "steps_measured": args.steps,
        "pairs_per_s": {k: round(v, 2) for k, v in rows.items()},
        "ratio_to_first": {k: round(v / first, 3) for k, v in rows.items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
