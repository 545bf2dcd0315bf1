"""Batch embedding of a catalog with Ray Data: a stateful UDF that loads the model once per
actor and calls the encoder's one ``encode`` path; :func:`embed_catalog` embeds and brings the
vectors to the driver (index builds, mining and evaluation)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import ray

from retrieval_platform.cluster import require_gpus
from retrieval_platform.encoder.model import DualEncoder, model_location, resolve_model_folder


@dataclass
class EmbedConfig:
    batch_size: int = 256  # rows per Ray Data batch
    encode_batch_size: int = 64  # texts per forward pass
    actors: int = 2  # Ray Data actor pool size
    cpus_per_actor: float = 0.9  # a little under 1 leaves room for the read tasks
    precision: Literal["fp32", "bf16", "int8", "auto"] = "fp32"
    # what runs the backbone (encoder.ort_backend): onnx on CPU only, fp32 or int8
    runtime: Literal["torch", "onnx"] = "torch"
    # GPUs per actor (fractions share one): the model runs on CUDA, in bf16 under ``auto``
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.runtime == "onnx" and (self.num_gpus or self.precision == "bf16"):
            raise ValueError("embed.runtime onnx runs on CPU in fp32 or int8: set num_gpus 0 "
                             "and precision fp32, int8 or auto, or use runtime torch")


class ProductEmbedder:
    """Ray Data UDF: adds an ``embedding`` column (unit float32 vectors) from the ``text`` one."""

    def __init__(self, model: str, encode_batch_size: int, precision: str,
                 num_threads: int, runtime: str = "torch") -> None:
        import torch

        torch.set_num_threads(num_threads)
        # resolved here, on this actor's node: a driver's local folder may not exist here
        self.model = DualEncoder.from_pretrained(resolve_model_folder(model))
        if torch.cuda.is_available() and ray.get_gpu_ids():  # this actor was given a GPU
            self.model.to("cuda")
        self.batch_size = encode_batch_size
        self.precision, self.runtime = precision, runtime

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch["text"].to_pylist()
        vectors = self.model.encode(texts, "product", batch_size=self.batch_size,
                                    precision=self.precision, runtime=self.runtime)  # (n, d)
        return batch.append_column("embedding", vector_column(vectors))


def vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 vectors as an Arrow column of fixed-size lists (the ``embedding``
    column of every embedded table)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embed_products(ds: ray.data.Dataset, model: str | Path, cfg: EmbedConfig
                   ) -> ray.data.Dataset:
    """``ds`` with ``product_id`` and ``text`` columns -> the same rows with ``embedding``;
    ``model`` as :func:`~retrieval_platform.encoder.model.model_location` names it."""
    require_gpus(cfg.num_gpus, "embed.num_gpus")
    return ds.map_batches(
        ProductEmbedder,
        fn_constructor_kwargs=dict(model=model_location(model), precision=cfg.precision,
                                   runtime=cfg.runtime,
                                   encode_batch_size=cfg.encode_batch_size,
                                   num_threads=max(1, math.ceil(cfg.cpus_per_actor))),
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.num_gpus or None,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
    )


def collect(ds: ray.data.Dataset, columns: list[str]) -> tuple[dict[str, list], np.ndarray]:
    """Bring an embedded dataset to the driver: its other columns and an (n, d) matrix."""
    # No select_columns here: a projection after the actor stage is a task needing a CPU the
    # actors still hold, and the execution would wait forever. Pick the columns locally.
    tables = [t.select([*columns, "embedding"]) for t in ray.get(ds.to_arrow_refs())
              if t.num_rows]
    table = pa.concat_tables(tables)
    return {c: table[c].to_pylist() for c in columns}, vectors_of(table["embedding"])


def vectors_of(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """An ``embedding`` column (fixed-size lists) as an (n, d) float32 matrix."""
    emb = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = emb.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, emb.type.list_size).astype(np.float32)


def embed_catalog(products: ray.data.Dataset, model: str | Path, cfg: EmbedConfig,
                  columns: list[str]) -> tuple[dict[str, list], np.ndarray]:
    """Embed ``products`` (``product_id``, ``text`` and ``columns``) with ``model`` on the
    actor pool, and return ``columns`` as lists and the (n, d) vectors, in one order."""
    return collect(embed_products(products, model, cfg), columns)
