"""The Serve application: typed arguments and the builder named by the Serve config file."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from retrieval_platform import storage
from retrieval_platform.cluster import require_gpus
from retrieval_platform.encoder.model import model_location
from retrieval_platform.errors import PlatformError
from retrieval_platform.experiments.arms import Arm, Experiment, ExperimentError
from retrieval_platform.index.store import IndexLoadError, IndexManifest, load_manifest, load_shard
from retrieval_platform.reranker.model import reranker_info
from retrieval_platform.serving.deployments import (
    IndexShard,
    Ingress,
    LexicalIndex,
    QueryEncoder,
    Reranker,
)
from retrieval_platform.serving.search import load_encoder_for
from retrieval_platform.serving.writer import CatalogWriter


class EncoderArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0, description="load above target this long adds "
                                   "replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below target this long "
                                     "removes replicas")
    cpus: float = Field(0.5, gt=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    precision: Literal["fp32", "bf16", "int8", "auto"] = "fp32"
    gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share one): the "
                        "encoder runs on CUDA, bf16 under precision auto; FAISS stays on CPU")
    threads: int | None = Field(None, ge=1, description="torch (or ONNX Runtime intra-op) "
                                "threads per replica (Ray sets one thread for a fractional "
                                "CPU; more helps on idle cores)")
    runtime: Literal["torch", "onnx"] = Field(
        "torch", description="what runs the query encoder's backbone: onnx (ONNX Runtime, "
        "CPU, precision fp32 or int8) is exported from the same weights and checked against "
        "torch (cosine >= 0.999) when a version loads; the rest of encode() is shared")

    @model_validator(mode="after")
    def _runtime_fits(self) -> EncoderArgs:
        if self.runtime == "onnx" and (self.gpus or self.precision == "bf16"):
            raise ValueError("encoder.runtime onnx runs on CPU in fp32 or int8: set gpus 0 and "
                             "precision fp32, int8 or auto, or use runtime torch")
        return self


class RerankerArgs(BaseModel):
    """The optional cross-encoder stage: its own deployment (batched, autoscaling)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="a reranker folder (train_jobs.rerank): an absolute "
                                        "path, or a storage URI on a cluster")
    default: bool = Field(False, description="rerank requests that do not say (\"rerank\")")
    depth: int = Field(50, ge=1, le=200, description="candidates reranked by default")
    timeout_s: float = Field(2.0, gt=0, description="past this, a request is answered "
                             "un-reranked (and says so)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    cpus: float = Field(1.0, gt=0)
    max_batch_size: int = Field(4, ge=1, description="requests scored in one forward pass")
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    precision: Literal["fp32", "bf16", "int8", "auto"] = "fp32"
    threads: int | None = Field(None, ge=1, description="torch threads per replica")

    @model_validator(mode="after")
    def _replicas(self) -> RerankerArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError("reranker.min_replicas must not exceed reranker.max_replicas")
        return self


class ImpressionLogArgs(BaseModel):
    """Where every answered search (and every shopper event) is logged, for experiments."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="a storage location (an absolute path, or a URI such "
                                       "as s3://bucket/logs on a cluster)")
    flush_interval_s: float = Field(1.0, gt=0, description="how often buffered impressions "
                                    "are written (an ingress lost between flushes loses at "
                                    "most this much of its log)")
    max_buffered: int = Field(100_000, ge=1, description="impressions held between flushes; "
                              "past this they are dropped and counted, never queued without "
                              "end")


class ArmArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64)
    index: str = Field(..., description="the arm's index version folder (its own model)")
    weight: float = Field(..., ge=0, allow_inf_nan=False)


class ExperimentArgs(BaseModel):
    """An experiment running from the start (``retrieval-platform experiment`` changes it at
    run time)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64)
    method: Literal["ab", "interleave"] = "ab"
    arms: list[ArmArgs] = Field(..., min_length=1)


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` of the Serve config). They fix the shape of the
    application; which index versions are loaded and served lives in the deployments'
    ``user_config`` (see :mod:`retrieval_platform.serving.control`), so a version swap is an
    in-place update, not a restart."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(..., description="index version folder (or a root whose LATEST names "
                                        "one) served at start: an absolute path, or a storage "
                                        "URI (s3://...) on a cluster")
    shard_replicas: int = Field(1, ge=1, description="replicas of each shard deployment")
    shard_cpus: float = Field(0.1, gt=0)
    encoder: EncoderArgs = Field(default_factory=EncoderArgs)
    reranker: RerankerArgs | None = Field(None, description="a cross-encoder stage behind the "
                                          "same endpoint; null: none")
    lexical: bool = Field(True, description="serve lexical and hybrid modes (the index must "
                                            "have been built with bm25)")
    lexical_cpus: float = Field(0.1, gt=0)
    lexical_replicas: int = Field(1, ge=1, description="replicas of the BM25 deployment (two on "
                                  "different nodes keep lexical and hybrid modes up when one "
                                  "node is lost)")
    ingress_replicas: int = Field(1, ge=1)
    ingress_cpus: float = Field(0.1, gt=0)
    ingress_max_batch_size: int = Field(8, ge=1, description="concurrent dense requests sent "
                                        "to the encoder and the shards together (1: each "
                                        "request alone)")
    ingress_batch_wait_timeout_s: float = Field(0.002, ge=0)
    max_ongoing_requests: int = Field(
        64, ge=1, description="per ingress and shard replica (async: they wait on others); "
                              "the encoder takes 2 x its batch size")
    api_key_env: str | None = Field(None, description="environment variable (on the cluster) "
                                    "holding the API key, read when the app is built")
    api_key_file: str | None = Field(None, description="file holding the API key (a mounted "
                                     "secret); with neither, no key is needed")
    max_body_bytes: int = Field(16_384, ge=256)
    request_timeout_s: float = Field(10.0, gt=0)
    # live catalog writes (PUT/PATCH/DELETE /products/{id}, POST /products:bulk)
    write_key_env: str | None = Field(None, description="environment variable holding the "
                                      "write key; with neither it nor write_key_file the "
                                      "deployment is read-only (writes answer 403)")
    write_key_file: str | None = Field(None, description="file holding the write key")
    max_write_body_bytes: int = Field(4 << 20, ge=1024)
    max_bulk_items: int = Field(1000, ge=1)
    write_timeout_s: float = Field(60.0, gt=0, description="a write's embedding and logging")
    writer_cpus: float = Field(0.1, gt=0)
    writer_max_batch_size: int = Field(256, ge=1, description="concurrent writes grouped "
                                       "into one embedding call and one log segment")
    log_poll_interval_s: float = Field(0.05, gt=0, description="how often every shard and "
                                       "BM25 replica looks for new changes in the log")
    impressions: ImpressionLogArgs | None = Field(None, description="the impression and event "
                                                  "log; null: none (POST /events answers 403)")
    experiment: ExperimentArgs | None = Field(None, description="arms served from the start")

    @model_validator(mode="after")
    def _replicas(self) -> AppArgs:
        if self.encoder.min_replicas > self.encoder.max_replicas:
            raise ValueError("encoder.min_replicas must not exceed encoder.max_replicas")
        return self


# Deployment names: the Serve config's overrides and the version swap (control.py) address
# deployments by these.
ENCODER, LEXICAL, INGRESS, WRITER = "QueryEncoder", "Lexical", "Ingress", "CatalogWriter"
RERANKER = "Reranker"


def shard_name(i: int) -> str:
    return f"Shard_{i}"


def version_user_configs(manifest: IndexManifest, versions: dict[str, str] | None = None,
                         experiment: Experiment | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(user_config of encoder/shards/BM25, user_config of the ingress) serving ``manifest``'s
    version, with ``versions`` (name -> folder) loaded (default: just that one), and
    ``experiment``'s arms (their versions among ``versions``) when one runs."""
    versions = versions or {manifest.version: manifest.path}
    loaded = {"versions": versions}
    active = {"active": manifest.version, "model_id": manifest.model.model_id,
              "fusion": asdict(manifest.fusion)}
    if experiment is not None:
        arms = {a.version: load_manifest(versions[a.version]) for a in experiment.arms}
        active |= {"experiment": experiment.to_dict(),
                   "arm_versions": {v: {"model_id": m.model.model_id,
                                        "fusion": asdict(m.fusion)} for v, m in arms.items()}}
    return loaded, active


def check_experiment(args: ExperimentArgs, served: IndexManifest,
                     loaded: dict[str, str] | None = None, *, load: bool = True
                     ) -> tuple[Experiment, dict[str, str]]:
    """The experiment ``args`` describe and its versions (name -> folder), each of
    ``served``'s shard count and none a version name that ``served`` or ``loaded`` (name ->
    folder) holds in another folder; with ``load``, each version checked too
    (``check_version``: its model loads, its vectors fit its index). A clear error before
    anything is deployed or changed; ``load=False`` reads back what was checked at deploy."""
    versions: dict[str, str] = {}
    arms = []
    for a in args.arms:
        index = storage.canonical(a.index)
        manifest = check_version(index) if load else load_manifest(index)
        if len(manifest.shards) != len(served.shards):
            raise ExperimentError(f"arm {a.name}: {a.index} has {len(manifest.shards)} shards, "
                                  f"the served index {len(served.shards)}: an experiment's "
                                  "arms share the shard deployments")
        known = {served.version: served.path, **(loaded or {}), **versions}
        if known.get(manifest.version, manifest.path) != manifest.path:
            raise ExperimentError(f"arm {a.name}: version {manifest.version} is served from "
                                  f"another folder than {manifest.path}")
        versions[manifest.version] = manifest.path
        arms.append(Arm(a.name, manifest.version, a.weight))
    return Experiment(args.name, tuple(arms), args.method), versions


def check_version(index_dir: str) -> IndexManifest:
    """Load everything a version needs, in this process, before any replica is touched: a
    corrupted or mismatched version is refused here and the running one keeps serving."""
    manifest = load_manifest(index_dir)
    encoder = load_encoder_for(index_dir)
    width = encoder.encode(["dimension probe"]).shape[1]
    if width != manifest.dim:
        raise IndexLoadError(f"{index_dir}: its model gives {width}-dimensional vectors, its "
                             f"index holds {manifest.dim}-dimensional ones")
    for shard in manifest.shards:
        load_shard(index_dir, shard.id)
    return manifest


def read_secret(env: str | None, file: str | None, what: str) -> str | None:
    """A key from an environment variable or a file (a mounted secret); None: neither set."""
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise PlatformError(f"{what}_env={env}: that environment variable is not set (or "
                                "empty) where the application is built")
        return key
    if file:
        try:
            key = Path(file).read_text().strip()
        except OSError as exc:
            raise PlatformError(f"{what}_file: cannot read {file} ({exc})") from None
        if not key:
            raise PlatformError(f"{what}_file: {file} is empty")
        return key
    return None


def build_app(args: AppArgs) -> Application:
    """Encoder (autoscaling, batching) + one deployment per shard + BM25 behind one ingress."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    manifest = load_manifest(args.index)
    if args.lexical and not manifest.bm25:
        raise PlatformError(f"{args.index}: built without bm25; set lexical: false or rebuild")
    api_key = read_secret(args.api_key_env, args.api_key_file, "api_key")
    write_key = read_secret(args.write_key_env, args.write_key_file, "write_key")
    if write_key is not None and write_key == api_key:
        raise PlatformError("the write key must differ from the read key")
    experiment, versions = (check_experiment(args.experiment, manifest) if args.experiment
                            else (None, {}))
    loaded, active = version_user_configs(manifest, {manifest.version: manifest.path}
                                          | versions, experiment)
    e = args.encoder
    require_gpus(e.gpus, "encoder.gpus")
    encoder = QueryEncoder.options(
        name=ENCODER, user_config=loaded,
        ray_actor_options={"num_cpus": e.cpus} | ({"num_gpus": e.gpus} if e.gpus else {}),
        # Serve's default of 5 ongoing requests would cap every batch at 5 queries.
        max_ongoing_requests=2 * e.max_batch_size,
        autoscaling_config={"min_replicas": e.min_replicas, "max_replicas": e.max_replicas,
                            "target_ongoing_requests": e.target_ongoing_requests,
                            "upscale_delay_s": e.upscale_delay_s,
                            "downscale_delay_s": e.downscale_delay_s},
    ).bind(e.max_batch_size, e.batch_wait_timeout_s, e.precision, e.threads, e.runtime)
    shards = [
        IndexShard.options(name=shard_name(i), num_replicas=args.shard_replicas, user_config=loaded,
                           max_ongoing_requests=args.max_ongoing_requests,
                           ray_actor_options={"num_cpus": args.shard_cpus})
        .bind(i, args.log_poll_interval_s)
        for i in range(len(manifest.shards))
    ]
    lexical = (LexicalIndex.options(name=LEXICAL, user_config=loaded,
                                    num_replicas=args.lexical_replicas,
                                    ray_actor_options={"num_cpus": args.lexical_cpus})
               .bind(args.log_poll_interval_s)
               if args.lexical else None)
    # one writer: the log's sequence numbers are dense and ordered
    writer = (CatalogWriter.options(name=WRITER, num_replicas=1, user_config=loaded,
                                    max_ongoing_requests=4 * args.writer_max_batch_size,
                                    ray_actor_options={"num_cpus": args.writer_cpus})
              .bind(encoder, args.writer_max_batch_size) if write_key else None)
    reranker = None
    if args.reranker is not None:
        r = args.reranker
        reranker_info(storage.fetch(r.model))  # a clear error here, before any replica starts
        reranker = Reranker.options(
            name=RERANKER, user_config=loaded, max_ongoing_requests=4 * r.max_batch_size,
            ray_actor_options={"num_cpus": r.cpus},
            autoscaling_config={"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                "target_ongoing_requests": r.target_ongoing_requests},
        ).bind(model_location(r.model), r.max_batch_size, r.batch_wait_timeout_s, r.precision,
               r.threads, args.log_poll_interval_s)
    return Ingress.options(
        name=INGRESS, num_replicas=args.ingress_replicas, user_config=active,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.ingress_cpus},
    ).bind(encoder, shards, lexical, writer, reranker,
           rerank_default=bool(args.reranker and args.reranker.default),
           rerank_depth=args.reranker.depth if args.reranker else 50,
           rerank_timeout_s=args.reranker.timeout_s if args.reranker else 2.0,
           api_key=api_key, write_key=write_key,
           max_body_bytes=args.max_body_bytes, max_write_body_bytes=args.max_write_body_bytes,
           max_bulk_items=args.max_bulk_items, timeout_s=args.request_timeout_s,
           write_timeout_s=args.write_timeout_s, max_batch_size=args.ingress_max_batch_size,
           batch_wait_timeout_s=args.ingress_batch_wait_timeout_s,
           impressions=args.impressions.model_dump() if args.impressions else None)
