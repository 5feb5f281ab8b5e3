"""Build the DeepSpeed config: a ``ds_configs/`` preset merged with the run's own settings.

DeepSpeed validates its sub-sections (``zero_optimization`` refuses unknown keys) but
silently ignores unknown *top-level* keys, so those are checked here against the keys this
project writes or that users may put in a preset. DeepSpeed's own monitors (``tensorboard``,
``wandb``, ``csv_monitor``, ``comet``) are passed through to it, checked by its own model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitssl.train.config import ConfigError, RunConfig

DS_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

MONITOR_KEYS = ("tensorboard", "wandb", "csv_monitor", "comet")
"""DeepSpeed's monitor sections (``deepspeed.monitor.config``): DeepSpeed reads them and writes
its own ``Train/Samples/*`` events, beside this project's TensorBoard, JSONL and W&B logs."""

KNOWN_TOP_LEVEL_KEYS = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "zero_optimization",
        "bf16",
        "fp16",
        "steps_per_print",
        "wall_clock_breakdown",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "communication_data_type",
        "prescale_gradients",
        "gradient_predivide_factor",
        "activation_checkpointing",
        "flops_profiler",
        "checkpoint",
        "data_types",
        "memory_breakdown",
        "dump_state",
        "comms_logger",
        "aio",
        *MONITOR_KEYS,
    }
)


def load_preset(name: str) -> dict[str, Any]:
    path = DS_CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"DeepSpeed preset {name!r} not found in {DS_CONFIGS_DIR}")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed preset {path}: {e}") from None
    if not isinstance(preset, dict):
        raise ConfigError(f"DeepSpeed preset {path} must hold a JSON object")
    return preset


def build_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Preset + batch, accumulation, clipping and precision; checked before use."""
    ds = load_preset(cfg.train.zero)
    ds.update(
        {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "train_batch_size": cfg.global_batch(world_size),
            "gradient_clipping": cfg.optim.clip_grad if cfg.optim.clip_mode == "global" else 0.0,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            # The optimizer is ours (param groups, LARS/LAMB); DeepSpeed only wraps it.
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
        }
    )
    # DeepSpeed 0.19's bf16 overflow check reads two values back from the device every step
    # (ZeRO-1/2: has_overflow and is_invalid_grad_norm); the trainer's own device-side flag
    # and rollback handle a non-finite step instead, without a per-step sync.
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": False}
    ds["fp16"] = {
        "enabled": cfg.train.precision == "fp16",
        "loss_scale": 0,
        "initial_scale_power": 16,
    }
    check_ds_config(ds)
    return ds


def check_ds_config(ds: dict[str, Any]) -> None:
    """Refuse unknown top-level keys and let DeepSpeed's own models check the sections."""
    unknown = sorted(set(ds) - KNOWN_TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown DeepSpeed config key {unknown[0]!r} (DeepSpeed would silently ignore it)"
        )
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    except Exception as e:  # pydantic.ValidationError: keep the first line only
        raise ConfigError(f"invalid zero_optimization in DeepSpeed config: {_first(e)}") from None
    try:
        get_monitor_config({k: ds[k] for k in MONITOR_KEYS if k in ds})
    except Exception as e:
        raise ConfigError(f"invalid monitor section in DeepSpeed config: {_first(e)}") from None


def _first(error: Exception) -> str:
    """The field and message of a pydantic error (its lines 2-3), or the whole message."""
    lines = str(error).strip().splitlines()
    return " ".join(lines[1:3]) if len(lines) > 1 else str(error)
