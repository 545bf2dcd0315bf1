"""Catalog embedding throughput: Ray Data (the actor pool that evaluation, mining and index
builds use) against a plain single-process loop with the same model, encode batch and
precision, on this machine, in one run.

    python bench/embed_throughput.py [--prepared runs/data/homedepot] [--model minilm-l6]
        [--products 20000] [--precisions fp32 auto int8]

The plain loop holds every core in one process (torch threads = cores); Ray Data runs one
single-threaded actor per core. Both embed the same first ``--products`` product texts; the
ratio is Ray Data's texts/s over the loop's, and the vectors are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _setup import local_ray, synthetic_catalog

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.encoder.batch import EmbedConfig, collect, embed_products
from retrieval_platform.encoder.model import DualEncoder, resolve_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", help="a prepared dataset (default: a generated one)")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--products", type=int, default=20000)
    parser.add_argument("--encode-batch", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto", "int8"])
    parser.add_argument("--json")
    args = parser.parse_args()
    cpus = local_ray()
    prepared = args.prepared or f"{synthetic_catalog(args.products, 'embed-bench-')}/data"
    ds = PreparedDataset(prepared)
    table = ds.products(["product_id", "text"]).slice(0, args.products)
    texts = table["text"].to_pylist()
    folder = resolve_model_folder(args.model)
    rows = {}
    for precision in args.precisions:
        torch.set_num_threads(cpus)
        model = DualEncoder.from_pretrained(folder)
        model.encode(texts[:256], "product", batch_size=args.encode_batch, precision=precision)
        t = time.perf_counter()
        plain = model.encode(texts, "product", batch_size=args.encode_batch,
                             precision=precision)
        plain_rate = len(texts) / (time.perf_counter() - t)
        del model
        cfg = EmbedConfig(batch_size=1024, encode_batch_size=args.encode_batch, actors=cpus,
                          cpus_per_actor=0.9, precision=precision)
        t = time.perf_counter()
        cols, vectors = collect(embed_products(ds.products_dataset(table=table), str(folder),
                                               cfg), ["product_id"])
        ray_rate = len(texts) / (time.perf_counter() - t)  # actor start-up and model load count
        order = {p: i for i, p in enumerate(table["product_id"].to_pylist())}
        agree = float(np.min(np.sum(plain[[order[p] for p in cols["product_id"]]] * vectors,
                                    axis=1)))
        rows[precision] = {"plain_texts_per_s": round(plain_rate, 1),
                           "ray_data_texts_per_s": round(ray_rate, 1),
                           "ratio": round(ray_rate / plain_rate, 3),
                           "min_cosine_plain_vs_ray": round(agree, 5)}
        print(precision, rows[precision], flush=True)
    out = {"model": args.model, "products": len(texts), "cpus": cpus,
           "encode_batch": args.encode_batch, "rows": rows}
    print(json.dumps(out, indent=2))
    print("\n| precision | plain loop texts/s | Ray Data texts/s | ratio |\n|---|---:|---:|---:|")
    for p, r in rows.items():
        print(f"| {p} | {r['plain_texts_per_s']} | {r['ray_data_texts_per_s']} | {r['ratio']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
