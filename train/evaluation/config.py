"""Typed configuration of the frozen-encoder evaluations (k-NN, linear, label efficiency,
pictures). Recipes are TOML files (``train/recipes/eval_*.toml``) plus dotted overrides,
built with ``vitssl.train.config.build_dataclass``: unknown keys and bad values are refused.
Fine-tuning is a training run and uses :class:`vitssl.train.config.RunConfig` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vitssl.train.config import ConfigError, build_dataclass, load_raw


@dataclass
class EncoderSection:
    """Which encoder is evaluated and which features are read from it."""

    checkpoint: str = ""
    """Run directory, checkpoint directory, encoder.safetensors, random:<timm_name>, or
    pixels (the flattened normalised image: the raw-pixel baseline)."""
    pool: str = "cls"
    """ViT feature: cls (class token) or avg (mean of patch tokens); CNNs always average."""
    img_size: int = 32
    """Resolution of a random:<timm_name> encoder (checkpoints carry their own)."""
    patch_size: int = 4
    """Patch size of a random:<timm_name> encoder."""
    compare_random: bool = True
    """Also evaluate a randomly initialised encoder of the same architecture."""
    compare_pixels: bool = False
    """Also evaluate raw pixels (the flattened normalised image) as features."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("encoder.checkpoint is required (a run dir, checkpoint or export)")
        if self.pool not in ("cls", "avg"):
            raise ConfigError(f"encoder.pool must be cls or avg, got {self.pool!r}")


@dataclass
class EvalDataSection:
    """Labelled data: shards (brace pattern) or an ImageFolder directory, per split."""

    train: str = ""
    """The bank / training set."""
    val: str = ""
    """The evaluation set."""
    train_index: str = ""
    """index.json of the training shards (default: beside the first shard)."""
    val_index: str = ""
    """index.json of the validation shards."""
    batch_size: int = 128
    """Images per forward pass when extracting features."""
    num_workers: int = 2
    """Decode workers per rank."""
    train_limit: int = 0
    """Use only the first N training samples (0: all); for quick checks on a small budget."""
    val_limit: int = 0
    """Use only the first N validation samples (0: all)."""
    cache: bool = True
    """Keep extracted features in <output_dir>/features/ and reuse them across commands."""

    def __post_init__(self) -> None:
        if self.train_limit < 0 or self.val_limit < 0:
            raise ConfigError("data.train_limit and data.val_limit must be >= 0")
        if not self.train or not self.val:
            raise ConfigError("data.train and data.val are required (labelled shards or a folder)")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0")


@dataclass
class KNNSection:
    """Weighted k-NN (DINO) and majority voting."""

    k: int = 20
    """Neighbours that vote."""
    temperature: float = 0.07
    """Vote weight exp(sim / T)."""
    chunk_size: int = 65536
    """Bank rows compared at once."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0 or self.chunk_size < 1:
            raise ConfigError("knn.k and knn.chunk_size must be >= 1, knn.temperature > 0")


@dataclass
class LinearSection:
    """Linear probe: one head per learning rate, trained together."""

    base_lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    """Learning rates per 256 samples (lr = base_lr * batch_size / 256)."""
    epochs: int = 100
    """Passes over the training features."""
    batch_size: int = 256
    """Samples per step."""
    head: str = "bn_linear"
    """bn_linear (BatchNorm1d without affine + Linear, MAE) or linear."""
    optimizer: str = "sgd"
    """sgd (momentum 0.9, DINO) or lars (MAE)."""
    weight_decay: float = 0.0
    """Weight decay of the heads."""
    warmup_epochs: int = 0
    """Linear warm-up before the cosine."""
    on_the_fly: bool = False
    """Encode augmented images every epoch instead of caching features."""

    def __post_init__(self) -> None:
        if not self.base_lrs or any(lr <= 0 for lr in self.base_lrs):
            raise ConfigError("linear.base_lrs must be a non-empty list of positive numbers")
        if self.epochs < 1 or self.batch_size < 2 or self.warmup_epochs < 0:
            raise ConfigError("linear.epochs >= 1, linear.batch_size >= 2, warmup_epochs >= 0")
        if self.head not in ("bn_linear", "linear"):
            raise ConfigError(f"linear.head must be bn_linear or linear, got {self.head!r}")
        if self.optimizer not in ("sgd", "lars"):
            raise ConfigError(f"linear.optimizer must be sgd or lars, got {self.optimizer!r}")


@dataclass
class LabelEfficiencySection:
    """Accuracy against the fraction of labels kept (stratified per class)."""

    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    """Fractions of the labelled training set."""
    seed: int = 0
    """Seed of the subsets (the same seed gives the same, nested subsets)."""
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    """Classifiers trained on each subset: knn and/or linear."""

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError("label_efficiency.fractions must be numbers in (0, 1]")
        bad = [p for p in self.protocols if p not in ("knn", "linear")]
        if bad or not self.protocols:
            raise ConfigError("label_efficiency.protocols must be a list of knn, linear")


@dataclass
class PicturesSection:
    """What the pictures command draws."""

    tsne_samples: int = 1000
    """Validation samples in the t-SNE / UMAP plots."""
    queries: int = 8
    """Query images in the k-NN neighbour grid."""
    neighbours: int = 8
    """Neighbours shown per query."""
    mae_images: int = 8
    """Images in the MAE reconstruction grid (MAE checkpoints only)."""

    def __post_init__(self) -> None:
        if min(self.tsne_samples, self.queries, self.neighbours, self.mae_images) < 1:
            raise ConfigError("pictures.* counts must be >= 1")


@dataclass
class EvalConfig:
    """Everything a frozen-encoder evaluation needs; saved into every result."""

    encoder: EncoderSection = field(default_factory=lambda: EncoderSection(checkpoint="?"))
    data: EvalDataSection = field(default_factory=lambda: EvalDataSection(train="?", val="?"))
    knn: KNNSection = field(default_factory=KNNSection)
    linear: LinearSection = field(default_factory=LinearSection)
    label_efficiency: LabelEfficiencySection = field(default_factory=LabelEfficiencySection)
    pictures: PicturesSection = field(default_factory=PicturesSection)
    output_dir: str = "runs/eval"
    """Results (<protocol>.json/.md), pictures and TensorBoard go here."""
    seed: int = 0
    """Seed of the probes."""
    precision: str = "fp32"
    """Feature extraction precision: fp32, bf16 or fp16 (autocast)."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_eval_config(recipe: str | None, overrides: list[str]) -> EvalConfig:
    raw = load_raw(recipe, overrides)
    for section in ("encoder", "data"):
        if section not in raw:
            raise ConfigError(f"the recipe has no [{section}] table")
    return build_dataclass(EvalConfig, raw, "")
