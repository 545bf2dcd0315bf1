"""How often Eq. 2's margin rule would mask a stage-2 query's own judged products: the share of
each query's judged non-positive products (not its L₁ positive, not a labelled positive) that
outscore its positive by more than m — the products ``loss.exempt_labelled`` spares.

    python bench/stage2_margin.py MODEL [MODEL ...] [--prepared runs/data/homedepot]
        [--queries 400] [--margin 0.1]

The stage-2 examples are built as training builds them (``roar_examples``: ≤ 8 judged products
a query, Home Depot's grade bins), from the train split.
"""

from __future__ import annotations

import argparse

from retrieval_platform.catalog.dataset import PreparedDataset
from retrieval_platform.encoder.model import DualEncoder, resolve_model_folder
from retrieval_platform.training.examples import roar_examples


def masked_share(model: str, rows: list[dict], margin: float) -> tuple[int, int]:
    """(masked, judged non-positive products) over ``rows`` for ``model``."""
    encoder = DualEncoder.from_pretrained(resolve_model_folder(model))
    xq = encoder.encode([r["query_text"] for r in rows], "query", batch_size=64)  # (nq, d)
    xc = encoder.encode([t for r in rows for t in r["cand_texts"]], "product",
                        batch_size=64)  # (nc, d)
    masked = total = start = 0
    for i, r in enumerate(rows):
        n = len(r["cand_texts"])
        s = xc[start:start + n] @ xq[i]  # (n,)
        start += n
        if r["top_index"] < 0:  # no L₁ positive: the margin rule does not run
            continue
        positives = set(r["query_pos_keys"])
        for j in range(n):
            if j != r["top_index"] and r["cand_keys"][j] not in positives:
                total += 1
                masked += int(s[j] > s[r["top_index"]] + margin)
    return masked, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prepared", default="runs/data/homedepot")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--margin", type=float, default=0.1)
    args = parser.parse_args()
    table = roar_examples(PreparedDataset(args.prepared), max_candidates=8,
                          grade_bins=[1.8, 2.5])
    rows = table.slice(0, args.queries).to_pylist()
    for model in args.models:
        masked, total = masked_share(model, rows, args.margin)
        print(f"{model}: {masked}/{total} = {masked / max(total, 1):.3f} of the judged "
              f"non-positive products outscore the positive by > {args.margin}")


if __name__ == "__main__":
    main()
