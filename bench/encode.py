"""Encoding throughput (texts per second) of the backbones on this machine.

    python bench/encode.py [--backbones minilm-l6 smollm2-135m] [--texts 256]
                           [--precisions fp32 bf16]

Texts are truncated to exactly the given sequence length, so that each cell measures that
length. Results are printed as a Markdown table (and as JSON with --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from retrieval_platform.catalog.synthetic import generate_catalog
from retrieval_platform.encoder.model import DualEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["minilm-l6", "smollm2-135m"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--json")
    args = parser.parse_args()

    catalog = generate_catalog(2000, seed=0)
    # four copies of title + description: longer than every measured length, so truncation
    # makes each text exactly seq_len tokens
    long_texts = [" ".join([f"{t}. {d}"] * 4)
                  for t, d in zip(catalog.products["title"].to_pylist(),
                                  catalog.products["description"].to_pylist(), strict=True)
                  ][: args.texts]
    rows = []
    for name in args.backbones:
        for seq_len in args.seq_lens:
            model = DualEncoder.from_pretrained(name, max_product_length=seq_len)
            lengths = model.tokenize(long_texts, "product")["attention_mask"].sum(1)
            for precision in args.precisions:
                for batch_size in args.batch_sizes:
                    model.encode(long_texts[:batch_size], "product", batch_size=batch_size,
                                 precision=precision)  # warm-up
                    start = time.perf_counter()
                    model.encode(long_texts, "product", batch_size=batch_size,
                                 precision=precision)
                    seconds = time.perf_counter() - start
                    rows.append({"backbone": name, "seq_len": seq_len, "precision": precision,
                                 "mean_tokens": float(lengths.float().mean()),
                                 "batch_size": batch_size,
                                 "texts_per_s": round(len(long_texts) / seconds, 1)})
                    print(rows[-1], flush=True)
    print(f"\nMachine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("\n| backbone | seq len | mean tokens | precision | batch | texts/s |\n"
          "|---|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['seq_len']} | {r['mean_tokens']:.0f} | {r['precision']} "
              f"| {r['batch_size']} | {r['texts_per_s']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
