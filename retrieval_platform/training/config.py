"""Typed configuration of both training stages (one schema; ``stage`` picks the loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from retrieval_platform.encoder.lora import LoraSettings
from retrieval_platform.tracking import TrackingConfig
from retrieval_platform.training.augment import AugmentConfig


@dataclass
class ModelConfig:
    init: str = "minilm-l6"  # backbone name or model folder (stage 2: stage 1's output_dir)
    pooling: Literal["last", "mean"] | None = None  # None: as the backbone says
    query_instruction: str | None = None
    max_query_length: int | None = None
    max_product_length: int | None = None
    # a template around the texts, which token is pooled, which layer (encoder/model.py)
    product_prefix: str | None = None
    query_suffix: str | None = None
    product_suffix: str | None = None
    add_special_tokens: bool | None = None
    num_layers: int | None = None
    lora: LoraSettings | None = None  # train LoRA adapters only (decoders); null: full fine-tune


@dataclass
class DataConfig:
    prepared_dir: str = "runs/data/synthetic"
    split: str = "train"
    negatives_path: str | None = None  # Parquet from data_jobs.mine_negatives
    hard_negatives: int = 0  # H per stage-1 pair, drawn from the mined pool every epoch
    max_pairs_per_query: int | None = None
    # stage 1: extra pairs whose query is a training query misspelt or with its number and unit
    # written another way (training/augment.py); null: none
    augment: AugmentConfig | None = None
    positive_threshold: float | None = None  # stage-1 positives: grade >= this (None: scale's)
    max_candidates: int = 16  # stage 2: graded candidates per query
    # stage 2: mined products per query; in the batch's candidates without a grade (the lowest
    # group only where the grade scale says unlabelled means irrelevant)
    mined_per_query: int = 0
    # stage 2: ascending grade edges; ROAR groups products by bin instead of exact grade (mean
    # ratings that differ by one rater's vote fall in one group). null: every grade a group.
    grade_bins: list[float] | None = None
    # stage 2: a teacher's scores of each training query's candidate list (Parquet from
    # data_jobs.score_candidates: judged, mined and retrieved products); its unjudged products
    # join the query's extras (up to mined_per_query) and loss.distill_weight > 0 distils it
    teacher_scores_path: str | None = None


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 200
    batch_size: int = 32  # per worker: queries (stage 1: pairs)
    grad_clip: float = 1.0
    # bf16 autocast of the backbone (scores and losses stay fp32); auto: bf16 where it runs
    # natively (AVX512-BF16 / AMX CPUs, GPUs), since emulated bf16 is several times slower
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # texts per forward pass: a step's texts are sorted by length and embedded in chunks this
    # size, each padded only to its own longest text (same loss, less padding); 0: one pass
    length_bucket: int = 32
    # gradient caching (training/grad_cache.py): the batch is embedded without a graph, the
    # loss taken on the whole of it, then each length_bucket chunk re-embedded and
    # back-propagated alone. Same gradients, memory of one chunk, a second forward pass: for
    # batches whose activations do not fit.
    grad_cache: bool = False

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("max_steps and batch_size must be >= 1 and lr > 0")


@dataclass
class LossConfig:
    tau: float = 0.02  # τ, Eq. 1 (paper: 0.02)
    margin: float | None = 0.1  # m of the margin rule, Eq. 2 (paper: 0.1; null disables it)
    catalog_rule: bool = True  # Eq. 2: mask variant-group duplicates of the positive
    label_rule: bool = True  # Eq. 2: mask labelled positives of the query
    tau_align: float = 0.01  # τ_a, Eq. 4 (paper: 0.01)
    gamma: float = 0.0  # γ, Eq. 6: margin per grade step (paper: 0)
    beta: float = 0.1  # β, Eq. 7: weight of L_align next to L₁ (paper: 0.1)
    # Eq. 5-6 on adjacent groups' mean probabilities, or Eq. 5'/6' on every product pair of
    # adjacent groups (the paper's Δ read literally)
    pairing: Literal["group_mean", "products"] = "group_mean"
    # Eq. 4's row: every candidate of the batch, or only the query's own graded products
    align_softmax: Literal["batch", "graded"] = "batch"
    # stage 2: the margin rule (Eq. 2) never masks a query's own judged products (a labelled
    # product is never an unlabelled positive; 2.6 % of them outscore the positive by > m under
    # the Home Depot stage-1 model, bench/stage2_margin.py)
    exempt_labelled: bool = True
    # Matryoshka: the losses are also summed over the first d dimensions, renormalised (METHOD.md
    # "Encoder"; the paper serves 256). null: full dimension only.
    matryoshka_dims: list[int] | None = None
    # stage 2: λ of the teacher's listwise KL next to Eq. 7 (losses/listwise_distillation.py;
    # 0: off), the student's temperature on cosines and the teacher's on its own scores
    distill_weight: float = 0.0
    distill_tau: float = 0.05
    teacher_tau: float = 1.0

    def __post_init__(self) -> None:
        if self.tau <= 0 or self.tau_align <= 0:
            raise ValueError("tau and tau_align must be > 0")
        if self.distill_weight < 0 or self.distill_tau <= 0 or self.teacher_tau <= 0:
            raise ValueError("distill_weight must be >= 0, distill_tau and teacher_tau > 0")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    # how the workers spread over nodes: PACK fills one node first; SPREAD (or STRICT_SPREAD:
    # one worker a node, or fail) puts them on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"


@dataclass
class RunConfig:
    name: str = "stage1"  # a rerun with the same name resumes from its last checkpoint
    storage_path: str = "runs/train"
    checkpoint_every: int = 100
    num_to_keep: int = 2
    max_failures: int = 2  # worker failures survived (restart from the last checkpoint)
    seed: int = 0
    log_every: int = 10


@dataclass
class TrainConfig:
    stage: Literal["contrastive", "roar"] = "contrastive"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    output_dir: str = "runs/models/stage1"  # the final model folder
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow (tracking.py)

    def __post_init__(self) -> None:
        if self.loss.distill_weight > 0 and (self.stage != "roar"
                                             or not self.data.teacher_scores_path):
            raise ValueError("loss.distill_weight > 0 distils a teacher in stage 2: it needs "
                             "stage: roar and data.teacher_scores_path")
