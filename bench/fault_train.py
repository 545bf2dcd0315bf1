"""A training worker dies mid-run: the run resumes from its last checkpoint and finishes.

    python bench/fault_train.py [--backbone minilm-l6] [--steps 120] [--checkpoint-every 30]

One Ray Train worker process is SIGKILLed as soon as the run has a registered checkpoint. The
script reports the step the run resumed from (not 0), the final step, the time lost to the
restart, and checks that the final model loads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _setup import local_ray, synthetic_catalog

from retrieval_platform.config import from_dict
from retrieval_platform.encoder.model import DualEncoder
from retrieval_platform.training.config import TrainConfig
from tests.chaos import train_with_a_worker_killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--checkpoint-every", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    cpus = local_ray()
    tmp = synthetic_catalog(3000, "fault-train-")
    cfg = from_dict(TrainConfig, {
        "model": {"init": args.backbone, "max_product_length": 48},
        "data": {"prepared_dir": f"{tmp}/data"},
        "optim": {"max_steps": args.steps, "batch_size": 8},
        "scaling": {"num_workers": 2, "cpus_per_worker": cpus / 2},
        "run": {"name": "fault", "storage_path": f"{tmp}/runs",
                "checkpoint_every": args.checkpoint_every, "log_every": args.checkpoint_every,
                "max_failures": 2},
        "output_dir": f"{tmp}/model",
    })
    started = time.monotonic()
    result, kill = train_with_a_worker_killed(cfg)
    wall = time.monotonic() - started
    DualEncoder.from_pretrained(result.model_dir)  # the final model folder loads
    out = {
        "backbone": args.backbone, "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "worker_killed": kill is not None,
        "killed_after_s": round(kill[1] - started, 1) if kill else None,
        "resumed_from_step": result.metrics["resumed_from_step"],
        "final_step": result.metrics["step"],
        "wall_s": round(wall, 1),
        "final_loss": round(result.metrics["loss"], 4),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
