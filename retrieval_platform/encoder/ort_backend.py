"""ONNX Runtime as a second runtime for the encoder's backbone, never a second encode path.

Only the backbone's forward pass moves: :meth:`DualEncoder.encode` tokenises, pools,
normalises and truncates exactly as it does under torch, and calls an :class:`OrtBackbone` where
it would call the torch module (``encode(..., runtime="onnx")``). The graph is exported from the
same weights (adapters merged) on first use and kept in this node's cache, keyed by a hash of
those weights; before it serves, its vectors are checked against torch's on a fixed probe set
(cosine >= ``MIN_COSINE`` of its precision), and a graph that fails is refused, not served.
Training stays on torch; catalogs embedded under either runtime agree within that tolerance,
so query and product vectors stay comparable (docs/BENCHMARKS.md: NDCG@10 alike on dev).

``int8``: ONNX Runtime's dynamic quantisation of the exported graph (int8 weights per output
channel, activations quantised per batch), the same scheme as torch's ``int8_copy``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from retrieval_platform.errors import PlatformError
from retrieval_platform.io import cache_dir

if TYPE_CHECKING:
    from retrieval_platform.encoder.model import DualEncoder

OrtPrecision = Literal["fp32", "int8"]
# The lowest cosine to torch's fp32 vectors a graph may have on the probe texts to serve.
MIN_COSINE: dict[str, float] = {"fp32": 0.999, "int8": 0.95}
PROBE_TEXTS = [
    "cordless drill 18v", "white kitchen faucet with sprayer", "3/4 in. plywood sheet",
    "led light bulb 60 watt equivalent", "outdoor patio furniture set", "x",
    "a much longer query about white interior paint for bathroom walls and ceilings",
    "Milwaukee M18 FUEL 1/2 in. hammer drill kit with two batteries and charger",
]


class OrtExportError(PlatformError):
    """The backbone could not be exported, or its graph's vectors differ from torch's."""


@dataclass
class _Output:
    last_hidden_state: torch.Tensor  # (B, L, D), what the torch backbone's output holds


class OrtBackbone:
    """An ONNX Runtime session called like the torch backbone (``input_ids``,
    ``attention_mask`` -> an output with ``last_hidden_state``)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # one replica, one request stream: its cores go to one op at a time (intra-op)
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.probe_cosine: float | None = None  # set by ``ort_backbone`` once checked
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Output:
        (hidden,) = self.session.run(None, {"input_ids": input_ids.cpu().numpy(),
                                            "attention_mask": attention_mask.cpu().numpy()})
        return _Output(torch.from_numpy(hidden))  # (B, L, D)


class _HiddenStates(nn.Module):
    """The backbone with a tensor output (what the exporter traces)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # no key/value cache: a decoder's cache object is not traceable, and never read here
        extra = {"use_cache": False} if hasattr(self.backbone.config, "use_cache") else {}
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return out.last_hidden_state  # (B, L, D)


def weights_hash(module: nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def export_backbone(backbone: nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    """Export ``backbone`` (eval, float32) to an ONNX graph at ``path`` with dynamic batch and
    sequence axes; written to a temporary file first, so a half-written graph never loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    axes = {0: "batch", 1: "length"}
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python
            torch.onnx.export(
                _HiddenStates(backbone.float().eval()),
                (example["input_ids"], example["attention_mask"]), tmp,
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes,
                              "last_hidden_state": axes},
                opset_version=17, dynamo=False)
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OrtExportError(f"cannot export the backbone to ONNX ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return path


def quantize_int8(source: Path, path: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of ``source`` (per output channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    logging.disable(logging.WARNING)  # its advice to pre-process, printed on every call
    try:
        quantize_dynamic(source, tmp, per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    os.replace(tmp, path)
    return path


def ort_backbone(model: DualEncoder, precision: OrtPrecision = "fp32",
                 threads: int | None = None) -> OrtBackbone:
    """``model``'s backbone under ONNX Runtime, exported (or found in the cache) and checked
    against torch on ``PROBE_TEXTS``; :class:`OrtExportError` where it does not agree."""
    from retrieval_platform.encoder.lora import merged

    if precision not in MIN_COSINE:
        raise ValueError(f"runtime onnx runs fp32 or int8, not {precision!r}")
    weights = merged(model.backbone)
    folder = cache_dir() / "onnx" / weights_hash(weights)
    fp32 = folder / "fp32.onnx"
    if not fp32.is_file():
        export_backbone(weights, model.tokenize(PROBE_TEXTS[:2], "query"), fp32)
    path = fp32 if precision == "fp32" else folder / "int8.onnx"
    if not path.is_file():
        quantize_int8(fp32, path)
    backbone = OrtBackbone(path, threads)
    cosine = probe_cosine(model, backbone)
    if cosine < MIN_COSINE[precision]:
        raise OrtExportError(f"{path}: the ONNX graph's vectors differ from torch's (lowest "
                             f"cosine {cosine:.4f} < {MIN_COSINE[precision]} on the probe "
                             "texts); serve with runtime torch")
    backbone.probe_cosine = cosine
    return backbone


def probe_cosine(model: DualEncoder, backbone: OrtBackbone) -> float:
    """The lowest cosine between torch fp32 and ``backbone`` vectors over the probe texts, as
    queries and as products."""
    lowest = 1.0
    for kind in ("query", "product"):
        ref = model.encode_with(PROBE_TEXTS, kind, None)  # (n, d)
        got = model.encode_with(PROBE_TEXTS, kind, backbone)  # (n, d)
        lowest = min(lowest, float(np.min(np.sum(ref * got, axis=1))))
    return lowest
