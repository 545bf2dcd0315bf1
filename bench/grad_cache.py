"""Gradient caching (``optim.grad_cache``): memory and speed of a stage-1 step against the global
batch, with and without the cache, measured in one run on this machine.

Each (batch, cached) cell runs in a fresh process (one PyTorch process holding every core,
``train_throughput.step_loop``: the Ray Train loop's own step), so its peak resident memory is
its own: ``peak_mb`` (VmHWM) and ``step_mb``, the peak above the memory after the model loaded
(what the step's activations cost). Pairs/s are over the steps after a warm-up step.

    python bench/grad_cache.py [--backbone minilm-l6] [--batches 64 256 1024]
        [--uncached-up-to 256] [--steps 3] [--precision fp32|bf16|auto]
        [--prepared runs/data/homedepot] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import torch

from retrieval_platform.training.config import OptimConfig


def _vm(field: str) -> float:
    """A /proc/self/status field in MB (VmRSS: now; VmHWM: the peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One cell: prints a JSON line with pairs/s and memory."""
    from train_throughput import step_loop  # bench/ is the script's folder: on the path

    from retrieval_platform.catalog.dataset import PreparedDataset
    from retrieval_platform.config import from_dict
    from retrieval_platform.encoder.model import resolve_precision
    from retrieval_platform.training.config import TrainConfig
    from retrieval_platform.training.examples import contrastive_examples
    from retrieval_platform.training.loop import load_init

    torch.set_num_threads(os.cpu_count() or 2)
    torch.manual_seed(0)
    cfg = from_dict(TrainConfig, {
        "model": {"init": args.backbone, "max_query_length": 24, "max_product_length": 48},
        "data": {"prepared_dir": args.prepared, "hard_negatives": args.negatives},
        "optim": {"length_bucket": 32, "grad_cache": args.cached}})
    examples = contrastive_examples(PreparedDataset(args.prepared),
                                    hard_negatives=args.negatives)
    model = load_init(cfg.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    loaded_mb = _vm("VmRSS")
    pairs_per_s = step_loop(model, opt, cfg, examples, args.batch, args.steps, warmup=1,
                            precision=resolve_precision(args.precision))
    peak = _vm("VmHWM")
    print(json.dumps({"pairs_per_s": pairs_per_s,
                      "peak_mb": peak, "step_mb": peak - loaded_mb}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--uncached-up-to", type=int, default=256,
                        help="the largest batch also run without the cache")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--precision", default="fp32",
                        choices=get_args(get_type_hints(OptimConfig)["precision"]),
                        help="autocast of the backbone (auto: bf16 where the CPU runs it natively)")
    parser.add_argument("--prepared", help="a prepared dataset (default: a generated one)")
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.prepared is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from _setup import synthetic_catalog

        args.prepared = f"{synthetic_catalog(3000, 'grad-cache-bench-')}/data"
    cells = [(b, c) for b in args.batches for c in (False, True)
             if c or b <= args.uncached_up_to]
    rows = []
    for batch, cached in cells:
        command = [sys.executable, __file__, "--child", "--batch", str(batch),
                   "--backbone", args.backbone, "--steps", str(args.steps),
                   "--negatives", str(args.negatives), "--precision", args.precision,
                   "--prepared", args.prepared]
        out = subprocess.run(command + (["--cached"] if cached else []), check=True,
                             capture_output=True, text=True)
        row = {"global_batch": batch, "grad_cache": cached} | json.loads(
            out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"batch {batch:5d} cache {'on ' if cached else 'off'}: "
              f"{row['pairs_per_s']:.1f} pairs/s, step memory {row['step_mb']:.0f} MB "
              f"(peak {row['peak_mb']:.0f} MB)", flush=True)
    base = {r["global_batch"]: r for r in rows if not r["grad_cache"]}
    for r in rows:
        plain = base.get(r["global_batch"])
        if r["grad_cache"] and plain:
            r["speed_vs_uncached"] = round(r["pairs_per_s"] / plain["pairs_per_s"], 3)
            r["step_memory_vs_uncached"] = round(r["step_mb"] / plain["step_mb"], 3)
    result = {"backbone": args.backbone, "cpus": os.cpu_count(), "steps": args.steps,
              "precision": args.precision,
              "negatives": args.negatives, "length_bucket": 32, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
