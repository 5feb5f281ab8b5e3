"""Typed run configuration: schema, defaults, validation, recipes and dotted overrides.

A recipe is a TOML file whose tables mirror :class:`RunConfig`. Overrides come from the
command line as ``section.key=value`` (values parsed as TOML, falling back to a string).
Unknown keys and invalid values raise ``ConfigError`` with a one-line message, before any
process group starts. Values that follow from others (global batch, accumulation) are
computed, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

from vitssl.models.registry import MethodConfig, method_config_class

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
PRECISIONS = ("bf16", "fp16", "fp32")
ZERO_PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")
ATTENTION_KERNELS = ("auto", "fused", "math")


class ConfigError(ValueError):
    """A user's configuration mistake, reported on one line."""


@dataclass
class ModelSection:
    """The backbone that is pretrained (and later exported)."""

    name: str = "vit_tiny_patch16_224"
    """A timm model name; ViT sizes come from timm (vit_tiny/small/base/large/huge/giant...)."""
    img_size: int = 32
    """Input resolution in pixels (square)."""
    patch_size: int = 4
    """ViT patch size; must divide ``img_size``."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the encoder blocks."""
    grad_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    grad_checkpointing_every: int = 1
    """With checkpointing on, checkpoint every k-th block only (selective checkpointing)."""
    cifar_stem: bool = False
    """For ResNet backbones: a 3x3 stride-1 stem without max-pool, for 32 px images."""
    fused_layernorm: bool = False
    """Replace LayerNorm with apex's FusedLayerNorm when apex is installed (warns otherwise)."""
    channels_last: bool = False
    """Refused (kept so that a config naming it gets a one-line reason): DeepSpeed 0.19's
    start-up broadcast views each parameter as bytes, which fails on channels-last weights
    in every precision and ZeRO stage; converting them after DeepSpeed's start would leave
    ZeRO-1/2/3's flat buffers and the bf16 master copies in another layout than the
    weights, and torch's fused AdamW silently misapplies updates across layouts."""
    attention: str = "auto"
    """ViT attention kernel: ``fused`` (``F.scaled_dot_product_attention``: flash /
    memory-efficient on GPUs), ``math`` (matmul + softmax) or ``auto``: fused on GPUs, math
    on CPUs, where the fused backward costs 14x its forward at ViT-tiny sizes (half the MAE
    step, measured with torch.profiler)."""
    init: str = ""
    """Start from these backbone weights instead of a random init: a run or checkpoint
    directory, an exported encoder, a timm state dict, or a published format (official MAE
    or DINO checkpoint, Hugging Face directory); they must fit this model. "" = random."""

    def __post_init__(self) -> None:
        if self.img_size <= 0 or self.patch_size <= 0:
            raise ConfigError("model.img_size and model.patch_size must be positive")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"model.patch_size={self.patch_size} does not divide model.img_size={self.img_size}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError("model.drop_path_rate must be in [0, 1)")
        if self.grad_checkpointing_every < 1:
            raise ConfigError("model.grad_checkpointing_every must be >= 1")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(
                f"model.attention={self.attention!r}: one of {', '.join(ATTENTION_KERNELS)}"
            )


@dataclass
class DataSection:
    """Where the images come from and how they are streamed."""

    train_shards: str = ""
    """Brace pattern or comma-separated list of .tar shards (``d/train-{000000..000009}.tar``)."""
    index: str = ""
    """JSON index written by make_shards; default: ``index.json`` beside the first shard."""
    val_shards: str = ""
    """Labelled shards for online k-NN monitoring and evaluation (optional)."""
    augmentation: str = "mae"
    """Augmentation preset: one per method family (see data_pipelines.transforms)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    max_skip_fraction: float = 0.01
    """Fail when more than this fraction of samples was unreadable."""
    resampled: bool = False
    """Draw shards with replacement (infinite stream) instead of epoch-bounded passes."""
    local_crops: int = 0
    """Extra small crops for multi-crop presets (DINO)."""
    local_crop_size: int = 96
    """Size of the local crops in pixels."""
    decode_on_device: bool = False
    """Decode (nvJPEG) and augment on the GPU; the CPU workers only read and batch bytes."""
    uint8_views: bool = True
    """Views leave the workers as 8-bit channels-last images and are normalised on the device
    (bit-identical for geometry-only views; colour-augmented ones rounded to 8 bits as in
    PIL pipelines): a quarter of the shared-memory and host-to-device bytes, and no float
    conversion in the workers."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError("data.max_skip_fraction must be in [0, 1]")
        if self.local_crops < 0:
            raise ConfigError("data.local_crops must be >= 0")


@dataclass
class OptimSection:
    """Optimizer and learning-rate schedule (warm-up then cosine, per step)."""

    name: str = "adamw"
    """adamw (default), lars or lamb."""
    base_lr: float = 1.5e-4
    """Learning rate per 256 images: lr = base_lr * global_batch / 256 (MAE's rule)."""
    min_lr: float = 0.0
    """Floor of the cosine."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to norms, biases, position/class/mask tokens."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear warm-up length in optimizer steps (used when ``warmup_epochs`` is 0)."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (the papers' unit); converted to steps at start."""
    clip_grad: float = 0.0
    """Clip gradients to this norm (0: off); see ``clip_mode``."""
    clip_mode: str = "global"
    """global (the norm of all gradients together, DeepSpeed's) or per_param (DINO's
    ``clip_gradients``: each parameter's gradient norm separately; needs train.zero=zero0
    and train.precision=fp32, where the optimizer sees whole parameters)."""
    wd_schedule: str = "constant"
    """constant, or cosine from ``weight_decay`` to ``weight_decay_end`` (DINO: 0.04 -> 0.4)."""
    weight_decay_end: float = 0.0
    """Final weight decay of the cosine schedule."""
    fused: bool = True
    """Use torch's fused AdamW kernel (CUDA and, since torch 2.4, CPU): one kernel for all
    parameters in place of a loop of small ops per tensor; the MAE benchmark's optimizer step
    on the CPU takes 24 ms in place of 38 (ZeRO-0, bf16). The update is AdamW's; only the
    rounding of the last bits differs. ``false`` loops over the tensors as the official
    MAE/DINO code does."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.name not in ("adamw", "lars", "lamb"):
            raise ConfigError(f"optim.name={self.name!r} is not one of adamw, lars, lamb")
        if self.base_lr <= 0:
            raise ConfigError("optim.base_lr must be > 0")
        if self.min_lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.clip_grad < 0:
            raise ConfigError("optim.min_lr, weight_decay, warmup_steps and clip_grad must be >= 0")
        if self.warmup_epochs < 0 or (self.warmup_epochs > 0 and self.warmup_steps > 0):
            raise ConfigError("give one of optim.warmup_epochs and optim.warmup_steps (>= 0)")
        if self.clip_mode not in ("global", "per_param"):
            raise ConfigError(
                f"optim.clip_mode must be global or per_param, got {self.clip_mode!r}"
            )
        if self.wd_schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"optim.wd_schedule must be constant or cosine, got {self.wd_schedule!r}"
            )
        if self.wd_schedule == "cosine" and (self.weight_decay <= 0 or self.weight_decay_end < 0):
            raise ConfigError(
                "optim.wd_schedule=cosine needs weight_decay > 0, weight_decay_end >= 0"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.betas must be two numbers in [0, 1)")

    def peak_lr(self, global_batch: int) -> float:
        return self.base_lr * global_batch / 256


@dataclass
class TrainSection:
    """Length, batch, precision and DeepSpeed preset of the run."""

    steps: int = 0
    """Optimizer steps to train for; > 0 overrides ``epochs`` (short and test runs)."""
    epochs: float = 0.0
    """Run length in passes over the data (the papers' unit); steps are derived at start
    from the data set size and the global batch (train/run_plan.py)."""
    micro_batch: int = 32
    """Images per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step when ``global_batch`` is 0 (global batch
    = micro x accum x world); derived from ``global_batch`` otherwise."""
    global_batch: int = 0
    """Target images per optimizer step, kept whatever the world size (accumulation is
    derived); 0: micro x grad_accum x world size."""
    allow_batch_change: bool = False
    """When the world size cannot reach ``global_batch`` exactly, use the nearest reachable
    one (peak lr follows the linear scaling rule; printed) instead of refusing."""
    precision: str = "bf16"
    """bf16, fp16 or fp32."""
    zero: str = "zero2"
    """A preset in ds_configs/: zero0, zero1, zero2, zero3, zero3_offload."""
    seed: int = 0
    """Seed of every random choice: data order, augmentation, masking, init."""
    output_dir: str = "runs/default"
    """Run directory: config, logs, checkpoints and exports go here."""
    compile: bool = False
    """torch.compile every block in place (ViT blocks, ResNet blocks)."""
    stop_at: int = 0
    """Stop with a checkpoint (exit code 75) after this step, as if preempted; 0: never."""
    max_rollbacks: int = 3
    """On a non-finite loss or gradient norm, reload the last complete checkpoint and skip
    the offending batch, at most this many times; then stop (exit code 3). 0: stop at once."""

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.grad_accum < 1 or self.steps < 0 or self.epochs < 0:
            raise ConfigError(
                "train.micro_batch and train.grad_accum must be >= 1, steps and epochs >= 0"
            )
        if self.global_batch < 0:
            raise ConfigError("train.global_batch must be >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")
        if self.stop_at < 0:
            raise ConfigError("train.stop_at must be >= 0")
        if self.max_rollbacks < 0:
            raise ConfigError("train.max_rollbacks must be >= 0")
        if self.zero not in ZERO_PRESETS:
            raise ConfigError(f"train.zero={self.zero!r} is not one of {ZERO_PRESETS}")


@dataclass
class CheckpointSection:
    """When checkpoints are written and which are kept."""

    every: int = 500
    """Write a checkpoint every N steps (and always at the end)."""
    keep: int = 3
    """Keep the last K complete checkpoints."""
    resume: str = "auto"
    """auto (latest complete checkpoint in the run directory, if any), none, or a path."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ConfigError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclass
class LogSection:
    """What is logged and how often."""

    every: int = 10
    """Scalars to TensorBoard and JSONL every N steps."""
    image_every: int = 200
    """Method pictures (MAE reconstructions) every N steps (0: never)."""
    monitor_every: int = 50
    """Collapse monitors every N steps (0: never)."""
    knn_every: int = 0
    """Online k-NN on data.val_shards every N steps (0: never)."""
    progress: bool = True
    """Show a progress bar with an ETA on rank 0."""
    wandb: bool = False
    """Also log scalars and images to Weights & Biases (extra ``wandb``; ``WANDB_MODE``)."""
    wandb_project: str = "vitssl"
    """The W&B project of the run (the W&B run is named after the run directory)."""


@dataclass
class RunConfig:
    """Everything a pretraining run needs; saved as ``config.json`` in the run directory."""

    model: ModelSection = field(default_factory=ModelSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def global_batch(self, world_size: int) -> int:
        return self.train.micro_batch * self.train.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = hint.__args__
        item = args[0]
        return (tuple if origin is tuple else list)(
            _coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)
        )
    return value


def build_dataclass(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build ``cls`` from ``raw``, refusing unknown keys and values of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {where + '.' if where else ''}{unknown[0]}; "
            f"valid keys of {where or 'the config'}: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        sub = f"{where}.{f.name}" if where else f.name
        if is_dataclass(hint):
            kwargs[f.name] = build_dataclass(hint, raw[f.name], sub)  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _coerce(raw[f.name], hint, sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:  # a component's own check (models/ raises ValueError), one line
        raise ConfigError(str(e)) from None


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig; the ``method`` table is typed by the method's own dataclass."""
    raw = dict(raw)
    method_raw = dict(raw.pop("method", {}) or {})
    name = method_raw.get("name", MethodConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"method.name must be a string, got {name!r}")
    try:
        method_cls = method_config_class(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = build_dataclass(RunConfig, raw, "")
    cfg.method = build_dataclass(method_cls, method_raw, "method")
    validate_cross(cfg)
    return cfg


def validate_cross(cfg: RunConfig) -> None:
    """Checks that involve more than one section (after each section checked itself)."""
    if cfg.train.steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("give the run length: train.epochs (or train.steps for short runs)")
    method_cls = type(cfg.method)
    if cfg.model.init and (method_cls.has_teacher or method_cls.weight_fields):
        raise ConfigError(
            f"model.init is for methods that train one backbone (mae, simclr, simsiam); "
            f"{cfg.method.name} builds a teacher or takes method.* weights instead"
        )
    if cfg.model.channels_last:
        raise ConfigError(
            "model.channels_last is not supported: DeepSpeed 0.19 views every parameter as "
            "bytes to broadcast it at start-up, which channels-last weights refuse"
        )
    if cfg.optim.name in ("lars", "lamb") and (
        cfg.train.zero != "zero0" or cfg.train.precision != "fp32"
    ):
        raise ConfigError(
            f"optim.name={cfg.optim.name} needs train.zero=zero0 and train.precision=fp32: "
            "ZeRO and DeepSpeed's bf16/fp16 optimizers hand it flat partitions, not layers"
        )
    if (
        cfg.optim.clip_mode == "per_param"
        and cfg.optim.clip_grad > 0
        and (cfg.train.zero != "zero0" or cfg.train.precision != "fp32")
    ):
        raise ConfigError(
            "optim.clip_mode=per_param needs train.zero=zero0 and train.precision=fp32: "
            "ZeRO and DeepSpeed's bf16/fp16 optimizers hand the optimizer flat partitions"
        )
    if cfg.data.decode_on_device and cfg.data.augmentation == "finetune":
        raise ConfigError(
            "data.augmentation=finetune (timm's RandAugment on PIL images) runs in the CPU "
            "workers: set data.decode_on_device=false"
        )
    if cfg.log.knn_every and not cfg.data.val_shards:
        raise ConfigError("log.knn_every needs data.val_shards (labelled shards)")


# ---------------------------------------------------------------- recipes and overrides


def parse_value(text: str) -> Any:
    """Parse an override's value as TOML (numbers, booleans, lists); else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
        node = nxt
    node[parts[-1]] = parse_value(text.strip())


def resolve_recipe_path(recipe: str, relative_to: Path | None = None) -> Path:
    """A recipe path or name; ``relative_to``: the folder of the recipe that extends it."""
    path = Path(recipe)
    candidates = [path] if relative_to is None else [relative_to / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    named = RECIPES_DIR / f"{recipe}.toml"
    if named.is_file():
        return named
    available = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    raise ConfigError(f"recipe {recipe!r} not found (a path, or one of: {', '.join(available)})")


def merge_tables(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge key by key, any other value replaces the base's."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(recipe: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's tables, with ``base = "other"`` (a name or a path) deep-merged beneath them."""
    if not chain:
        path = resolve_recipe_path(recipe).resolve()
    else:
        try:
            path = resolve_recipe_path(recipe, chain[-1].parent).resolve()
        except ConfigError:
            raise ConfigError(f"recipe {chain[-1].stem}: base {recipe!r} not found") from None
    if path in chain:
        cycle = " -> ".join(p.stem for p in (*chain, path))
        raise ConfigError(f"recipe {chain[0].stem}: base recipes form a cycle: {cycle}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"recipe {path.stem}: base must be a recipe name or path, got {base!r}")
    return merge_tables(read_recipe(base, (*chain, path)), raw)


def load_raw(recipe: str | None, overrides: list[str]) -> dict[str, Any]:
    raw: dict[str, Any] = read_recipe(recipe) if recipe else {}
    for item in overrides:
        apply_override(raw, item)
    return raw


def load_config(recipe: str | None, overrides: list[str] | None = None) -> RunConfig:
    return config_from_dict(load_raw(recipe, overrides or []))


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
