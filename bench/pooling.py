"""Which token and which layer of a decoder LLM to pool, zero-shot: a fixed sample of dev queries
over a sampled corpus, each variant a zero-shot model folder evaluated by the evaluate job.

    python bench/pooling.py --prepared runs/data/homedepot [--queries 200] [--products 3000]

Variants (docs/RESULTS.md "SmolLM2"): the appended EOS token of the last layer (the first
setting); the text's own last token, last layer or layer 20 of 30 (the backbone cut there);
a PromptEOL-style template (Jiang et al., 2023: 'This product: "[X]" means in one word: "'),
whose last token is pooled, last layer or layer 20. MiniLM zero-shot and BM25 for reference.
Writes the report (with per-query values for paired intervals) under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _setup import local_ray

from retrieval_platform.config import from_dict
from retrieval_platform.encoder.model import DualEncoder
from retrieval_platform.evaluation.run import EvaluateConfig, evaluate
from retrieval_platform.stats import paired_bootstrap

PROMPTEOL = {"query_instruction": 'This search query: "', "query_suffix": '" means in one word: "',
             "product_prefix": 'This product: "', "product_suffix": '" means in one word: "',
             "add_special_tokens": False}
CONTENT = {"query_instruction": "", "add_special_tokens": False}
VARIANTS: dict[str, dict] = {
    "eos_last_layer": {},
    "content_last_layer": CONTENT,
    "content_layer20": CONTENT | {"num_layers": 20},
    "prompteol_last_layer": PROMPTEOL,
    "prompteol_layer20": PROMPTEOL | {"num_layers": 20},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="runs/data/homedepot")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--products", type=int, default=3000)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/bench/pooling")
    args = parser.parse_args()

    out = Path(args.out)
    models = {}
    for name in args.only or VARIANTS:
        folder = out / "models" / name
        if not (folder / "config.json").is_file():
            DualEncoder.from_pretrained(args.backbone, **VARIANTS[name]).save(
                folder, {"zero_shot": True, "variant": VARIANTS[name]})
        models[name] = str(folder)
    models["minilm_zero_shot"] = "minilm-l6"
    local_ray()
    report = evaluate(from_dict(EvaluateConfig, {
        "prepared_dir": args.prepared, "split": "dev", "models": models, "bm25": True,
        "max_queries": args.queries, "max_products": args.products, "output_dir": str(out),
        "embed": {"actors": 2, "cpus_per_actor": 0.9, "precision": "auto",
                  "encode_batch_size": 64}}))
    pq = report["per_query"]
    base = "eos_last_layer" if "eos_last_layer" in pq else next(iter(pq))
    print(f"{report['queries']} dev queries, {report['products']} products (sampled corpus)")
    print(f"| variant | NDCG@10 | − {base} (95 % CI) |\n|---|---:|---|")
    for name in pq:
        diff = "" if name == base else str(paired_bootstrap(pq[base], pq[name], "ndcg@10"))
        print(f"| {name} | {report['results'][name]['ndcg@10']:.4f} | {diff} |")
    (out / "variants.json").write_text(json.dumps(VARIANTS, indent=1))


if __name__ == "__main__":
    main()
