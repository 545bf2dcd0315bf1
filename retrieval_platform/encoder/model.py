"""The Siamese dual encoder: one backbone, shared weights, for queries and products.

METHOD.md "Encoder":  e(x) = normalize(pool(backbone(prompt(x))))

- ``prompt``: queries get the instruction prefix; products are the rendered product text
  (rendered once, by ``prepare_catalog``). Either kind may be wrapped in a template, a prefix and
  a suffix around the (truncated) text: a PromptEOL-style template ends with a question whose
  answer the last token is to give ("... means in one word: \"").
- ``pool``: the last non-padding token for decoder LLMs, the mean over tokens for bidirectional
  encoders; chosen from the backbone's config, overridable. Which token is last is a setting
  (``add_special_tokens``: the tokenizer's appended EOS, or the text's or template's own last
  token), and so is which layer's state is pooled (``num_layers``: the backbone cut after that
  many layers, its final norm kept; a plain, smaller model folder).
- Similarity s(q, d) = e(q) · e(d): unit vectors, so FAISS inner product is cosine.

:meth:`DualEncoder.encode` is the one path from text to vectors used by Ray Data (catalog
embedding), Ray Train (via :meth:`DualEncoder.embed`, the same tokenisation and pooling with
gradients) and Ray Serve (the query encoder), so query and product vectors never drift apart.

A saved model is a standard folder: the Hugging Face backbone (safetensors) and tokenizer at its
root, sentence-transformers module files (so ``SentenceTransformer(path)`` loads it, with the
query instruction as its ``query`` prompt), and ``retrieval_platform.json`` with our settings and
the checksum of the weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval_platform import storage
from retrieval_platform.encoder.backbones import (
    BACKBONES,
    DEFAULT_QUERY_INSTRUCTION,
    backbone_spec,
    save_weights,
)
from retrieval_platform.encoder.lora import merged
from retrieval_platform.errors import PlatformError
from retrieval_platform.io import sha256_file, write_json

SETTINGS_FILE = "retrieval_platform.json"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
Kind = Literal["query", "product"]
Precision = Literal["fp32", "bf16", "int8", "auto"]
# what runs the backbone's forward pass (encoder.ort_backend); the rest of encode() is shared
Runtime = Literal["torch", "onnx"]

# Bidirectional encoders pool by mean; everything else (decoder LLMs) by last token.
ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta", "deberta-v2", "electra",
    "albert", "camembert", "modernbert", "nomic_bert", "new",
})


class ModelLoadError(PlatformError):
    """A model folder is missing, incomplete, or its weights do not match their checksum."""


@dataclass
class EncoderSettings:
    pooling: Literal["last", "mean"]
    query_instruction: str = DEFAULT_QUERY_INSTRUCTION
    product_prefix: str = ""
    max_query_length: int = 32
    max_product_length: int = 128
    base: str = ""  # the backbone this model started from
    query_suffix: str = ""  # after the query text (a template's end; kept under truncation)
    product_suffix: str = ""
    # the tokenizer's special tokens (our decoders: an appended EOS, pooled by "last"); false:
    # the text's or template's own last token is pooled
    add_special_tokens: bool = True
    num_layers: int | None = None  # keep the backbone's first N layers (None: all of them)


@functools.cache
def native_bf16(device: str = "cpu") -> bool:
    """Whether bfloat16 matrix products run natively here: a CUDA device, or a CPU with
    AVX512-BF16 or AMX. Elsewhere PyTorch emulates them and bf16 is several times slower."""
    if device == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell cheaply, so stay with fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str = "cpu") -> Literal["fp32", "bf16", "int8"]:
    """``auto`` is bf16 where it runs natively (:func:`native_bf16`), fp32 elsewhere. ``int8``
    (inference on CPU only): the backbone's linear layers dynamically quantised."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16", "int8"):
        raise ValueError(f"unknown precision {precision!r} (use fp32, bf16, int8 or auto)")
    if precision == "int8" and device != "cpu":
        raise ValueError("precision int8 (dynamic quantisation) runs on CPU only")
    return precision  # type: ignore[return-value]


def quiet_transformers() -> None:
    """No per-tensor progress bars when loading or saving weights (they flood job logs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states (B, L, D) with attention mask (B, L) into (B, D).

    ``last`` takes the last position whose mask is 1, which is right for left and right padding
    alike; ``mean`` averages the unmasked positions.
    """
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
    if mode == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)  # (L,)
        last = (mask * positions).argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
    raise ValueError(f"unknown pooling {mode!r} (use 'last' or 'mean')")


def length_chunks(texts: list[str], size: int) -> list[list[int]]:
    """Indices of ``texts`` sorted by length, in chunks of ``size``: each chunk padded to its
    own longest text wastes little (encoding and training both batch this way)."""
    order = np.argsort([len(t) for t in texts], kind="stable").tolist()
    return [order[lo : lo + size] for lo in range(0, len(texts), size)]


def truncate(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Matryoshka (METHOD.md "Encoder"): the first ``dim`` dimensions of unit vectors (N, D),
    renormalised; ``None`` or ``dim >= D`` leaves them whole."""
    if dim is None or dim >= x.shape[-1]:
        return x
    return F.normalize(x[..., :dim], dim=-1)  # (N, dim)


def infer_pooling(config: Any) -> Literal["last", "mean"]:
    """Mean pooling for bidirectional encoders, last-token pooling for decoder LLMs."""
    if getattr(config, "model_type", "") in ENCODER_MODEL_TYPES:
        return "mean"
    return "last"


class DualEncoder(nn.Module):
    """Embeds queries and products with one shared backbone into unit vectors."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: EncoderSettings) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings
        if tokenizer.pad_token is None:  # decoders often ship without one
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                backbone: nn.Module | None = None) -> torch.Tensor:
        out = (backbone or self.backbone)(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state  # (B, L, D)
        pooled = pool(hidden, attention_mask, self.settings.pooling)  # (B, D)
        return F.normalize(pooled.float(), dim=-1)

    def int8_backbone(self) -> nn.Module:
        """A copy of the backbone with its linear layers dynamically quantised to int8
        (:func:`int8_copy`), made once and kept; it serves ``encode(precision="int8")``.
        Embeddings stay float32."""
        return kept_int8(self, self.backbone, lambda: merged(self.backbone))

    def tokenize(self, texts: list[str], kind: Kind) -> dict[str, torch.Tensor]:
        s = self.settings
        if kind == "query":
            prefix, suffix, max_length = s.query_instruction, s.query_suffix, s.max_query_length
        elif kind == "product":
            prefix, suffix, max_length = s.product_prefix, s.product_suffix, s.max_product_length
        else:
            raise ValueError(f"kind must be 'query' or 'product', got {kind!r}")
        if suffix:  # cut the text itself to its budget, so that the template's end survives
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            texts = [t if len(i) <= max_length else self.tokenizer.decode(i[:max_length]).strip()
                     for t, i in zip(texts, ids, strict=True)]
        limit = {} if suffix else {"truncation": True,
                                     "max_length": max_length + self._prefix_tokens(prefix)}
        batch = self.tokenizer([prefix + t + suffix for t in texts], padding=True,
                               add_special_tokens=s.add_special_tokens, return_tensors="pt",
                               **limit)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def _prefix_tokens(self, prefix: str) -> int:
        # The length budget is for the text itself; the instruction does not eat into it.
        if not prefix:
            return 0
        cache = self.__dict__.setdefault("_prefix_cache", {})
        if prefix not in cache:
            cache[prefix] = len(self.tokenizer(prefix, add_special_tokens=False)["input_ids"])
        return cache[prefix]

    def embed(self, texts: list[str], kind: Kind, backbone: nn.Module | None = None
              ) -> torch.Tensor:
        """(N, D) unit vectors with gradients: the training path."""
        batch = self.tokenize(texts, kind)
        device = next(self.parameters()).device
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device), backbone)

    def ort_backbone(self, precision: Precision = "fp32") -> Any:
        """The backbone under ONNX Runtime (:func:`encoder.ort_backend.ort_backbone`: exported
        from these weights, checked against torch), made once per precision and kept; made
        again when the backbone is another object (new weights)."""
        from retrieval_platform.encoder.ort_backend import ort_backbone

        if precision == "bf16":
            raise ValueError("runtime onnx runs fp32 or int8, not bf16")
        precision = "int8" if precision == "int8" else "fp32"  # auto: fp32 on CPU
        kept = self.__dict__.setdefault("_ort", {})
        if kept.get(precision, (None,))[0] is not self.backbone:
            kept[precision] = (self.backbone, ort_backbone(self, precision))
        return kept[precision][1]

    def encode(self, texts: list[str], kind: Kind, batch_size: int = 64,
               precision: Precision = "fp32", dim: int | None = None,
               runtime: Runtime = "torch") -> np.ndarray:
        """(N, D) float32 unit vectors: the inference path (Data, Serve, evaluation); with
        ``dim``, the first ``dim`` dimensions renormalised (a Matryoshka-trained model).

        ``precision="bf16"`` runs the backbone under bfloat16 autocast: about 1.9x faster for
        SmolLM2 on an AVX512-BF16 CPU, cosine >= 0.998 to fp32 (bench/encode.py); ``auto``
        takes bf16 only where it runs natively; ``int8`` runs :meth:`int8_backbone` (CPU).
        ``runtime="onnx"`` runs the backbone's forward pass under ONNX Runtime
        (:meth:`ort_backbone`, fp32 or int8, CPU); tokenising, pooling and normalising stay
        this method's.
        """
        device = next(self.parameters()).device
        precision = resolve_precision(precision, device.type)
        if runtime == "onnx":
            if device.type != "cpu":
                raise ValueError("runtime onnx runs on CPU; use runtime torch on a GPU")
            return self.encode_with(texts, kind, self.ort_backbone(precision), batch_size, dim)
        if runtime != "torch":
            raise ValueError(f"unknown runtime {runtime!r} (use torch or onnx)")
        backbone = self.int8_backbone() if precision == "int8" else None
        return self.encode_with(texts, kind, backbone, batch_size, dim, precision == "bf16")

    @torch.inference_mode()
    def encode_with(self, texts: list[str], kind: Kind, backbone: Any, batch_size: int = 64,
                    dim: int | None = None, bf16: bool = False) -> np.ndarray:
        """:meth:`encode` with a given backbone forward (None: this model's own): texts in
        chunks of similar length, each tokenised, run, pooled and normalised by :meth:`embed`."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            width = self.dim if dim is None else min(dim, self.dim)
            out = np.empty((len(texts), width), dtype=np.float32)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                for idx in length_chunks(texts, batch_size):
                    chunk = [texts[i] for i in idx]
                    vectors = truncate(self.embed(chunk, kind, backbone).float(), dim)
                    out[idx] = vectors.cpu().numpy()
            return out
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------- persistence

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write a standard model folder (loads in transformers and sentence-transformers too)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        quiet_transformers()
        save_weights(merged(self.backbone), path)  # LoRA folded in
        self.tokenizer.save_pretrained(path)
        _write_sentence_transformers_files(path, self.settings, self.dim)
        write_json(path / SETTINGS_FILE, {
            "format_version": FORMAT_VERSION,
            "settings": asdict(self.settings),
            "dim": self.dim,
            "weights_sha256": sha256_file(path / WEIGHTS_FILE),
            "metadata": metadata or {},
        })
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **overrides: Any) -> DualEncoder:
        """A named backbone (``tiny``, ``minilm-l6``, ``smollm2-135m``), one of our model folders,
        or any Hugging Face / sentence-transformers folder. ``overrides`` replace settings."""
        from transformers import AutoModel, AutoTokenizer

        quiet_transformers()
        if str(name_or_path) in BACKBONES:
            spec = backbone_spec(str(name_or_path))
            folder = spec.resolve()
            settings = EncoderSettings(**{
                "pooling": spec.pooling, "query_instruction": spec.query_instruction,
                "max_query_length": spec.max_query_length,
                "max_product_length": spec.max_product_length, "base": spec.name,
                **spec.template})
        else:
            folder = Path(name_or_path)
            settings = _settings_of(folder)
        settings = EncoderSettings(**{**asdict(settings),
                                      **{k: v for k, v in overrides.items() if v is not None}})
        try:
            backbone = AutoModel.from_pretrained(folder, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{folder}: cannot load the model ({exc})") from None
        if settings.num_layers is not None:
            keep_layers(backbone, settings.num_layers)
        return cls(backbone, tokenizer, settings)


def int8_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode with its linear layers dynamically quantised to int8
    (torch's own: weights int8 per output channel, activations quantised per batch)."""
    import copy
    import warnings

    with warnings.catch_warnings():  # torch's deprecation notices of torch.ao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # per output channel: MiniLM's vectors keep cosine ~0.97-0.98 to fp32, against
        # ~0.94-0.96 with one scale per weight tensor
        return quantize_dynamic(copy.deepcopy(module).eval(),
                                {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def kept_int8(owner: nn.Module, backbone: nn.Module,
              weights: Callable[[], nn.Module] | None = None) -> nn.Module:
    """``int8_copy`` of ``weights()`` (default: ``backbone``), made once and kept on ``owner``;
    made again when ``owner``'s backbone is another object (new weights)."""
    cached = owner.__dict__.get("_int8")
    if cached is None or cached[0] is not backbone:
        cached = owner.__dict__["_int8"] = (backbone, int8_copy((weights or (lambda: backbone))()))
    return cached[1]


def layer_list(backbone: nn.Module) -> nn.ModuleList:
    """The transformer layers of a backbone: a decoder's ``layers``, a BERT-style encoder's
    ``encoder.layer``."""
    layers = getattr(backbone, "layers", None)
    if layers is None and hasattr(backbone, "encoder"):
        layers = getattr(backbone.encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise PlatformError(f"num_layers: {type(backbone).__name__} has no layer list")
    return layers


def keep_layers(backbone: nn.Module, n: int) -> None:
    """Cut a backbone after its first ``n`` layers (a decoder's final norm stays): the pooled
    state is then layer ``n``'s. The config says ``n`` layers, so a saved folder is a plain,
    smaller model that loads as it is."""
    layers = layer_list(backbone)
    if not 1 <= n <= len(layers):
        raise PlatformError(f"num_layers must be in 1..{len(layers)}, got {n}")
    if n == len(layers):
        return
    cut = layers[:n]
    if hasattr(backbone, "layers"):
        backbone.layers = cut
    else:
        backbone.encoder.layer = cut
    config = backbone.config
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None):  # per-layer attention kinds (newer configs)
        config.layer_types = config.layer_types[:n]


def _settings_of(folder: Path) -> EncoderSettings:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such model folder (or unknown backbone name; known: "
                             f"{', '.join(BACKBONES)})")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: not a model folder (no config.json)")
    ours = folder / SETTINGS_FILE
    if ours.is_file():
        meta = json.loads(ours.read_text())
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelLoadError(f"{folder}: missing weights ({WEIGHTS_FILE})")
        if sha256_file(weights) != meta["weights_sha256"]:
            raise ModelLoadError(f"{folder}: {WEIGHTS_FILE} does not match its recorded sha256 "
                                 "(corrupted or altered)")
        return EncoderSettings(**meta["settings"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    instruction = DEFAULT_QUERY_INSTRUCTION
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = json.loads(st_config.read_text()).get("prompts") or {}
        instruction = prompts.get("query", instruction)
    return EncoderSettings(infer_pooling(config), instruction, base=folder.name)


def model_info(folder: str | Path) -> dict[str, Any]:
    """What a model folder's ``retrieval_platform.json`` says (dim, checksum, settings), plus
    ``model_id``: the base backbone and the first 12 hex digits of the weights' sha256."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder}: not a model folder written by this platform "
                             f"(no {SETTINGS_FILE})")
    info = json.loads(path.read_text())
    info["model_id"] = f"{info['settings']['base'] or 'model'}-{info['weights_sha256'][:12]}"
    return info


def model_location(name_or_path: str | Path) -> str:
    """How every node names this model: a storage URI or a backbone name as it is, a local
    folder by its absolute path. Pass this, not a resolved folder, to code that runs in Ray
    tasks, actors or replicas: each resolves it on its own node."""
    text = str(name_or_path)
    return text if storage.is_remote(text) or text in BACKBONES else str(Path(text).absolute())


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """A model folder of ours for anything :meth:`DualEncoder.from_pretrained` accepts.

    Backbone names and foreign folders are saved once as zero-shot model folders in the cache,
    so that indexing, serving and evaluation always name weights by path and checksum.
    """
    from filelock import FileLock

    from retrieval_platform.io import cache_dir, publish_dir

    if storage.is_remote(name_or_path):  # this node's verified copy of a stored folder
        name_or_path = storage.fetch(name_or_path)
    path = Path(name_or_path)
    if (path / SETTINGS_FILE).is_file():
        return path.absolute()
    if str(name_or_path) in BACKBONES:
        key = f"{name_or_path}-zero-shot"
    else:
        _settings_of(path)  # a clear error for anything that is not a model folder
        key = f"{path.name}-{hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:8]}"
    target = cache_dir() / "models" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / SETTINGS_FILE).is_file():
            with publish_dir(target, overwrite=True) as tmp:
                DualEncoder.from_pretrained(name_or_path).save(tmp, {"zero_shot": True})
    return target


def _write_sentence_transformers_files(path: Path, settings: EncoderSettings, dim: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]
    write_json(path / "modules.json", modules)
    write_json(path / "sentence_bert_config.json",
               {"max_seq_length": settings.max_product_length, "do_lower_case": False})
    (path / "1_Pooling").mkdir(exist_ok=True)
    write_json(path / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": settings.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": settings.pooling == "last",
        "include_prompt": True,
    })
    (path / "2_Normalize").mkdir(exist_ok=True)
    write_json(path / "config_sentence_transformers.json", {
        "prompts": {"query": settings.query_instruction, "document": settings.product_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "model_type": "SentenceTransformer",
    })
