"""``build_engine()``: the one way a method becomes a DeepSpeed engine.

The trainer, the benchmark and the test probes all build their engine here, so that what a
benchmark times is what a run trains: the speed switches (fused LayerNorm, channels-last,
compiled blocks), the optimizer over the method's own groups at the run's peak learning rate, the
universal-checkpoint switch of an elastic resume, and the EMA teacher moved to the device
in the training precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitssl.models.methods.base import Method
from vitssl.train.checkpoint import ensure_universal, needs_universal
from vitssl.train.config import RunConfig
from vitssl.train.ds_config import build_ds_config
from vitssl.train.optim import build_optimizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``train.precision`` -> the dtype of the views and of the teacher."""


@dataclass
class BuiltEngine:
    engine: Any
    """The DeepSpeed engine wrapping the method."""
    ds_config: dict[str, Any]
    """The DeepSpeed config it was built with."""
    peak_lr: float
    """Peak learning rate after the batch-size scaling rule."""
    zero3: bool
    """Parameters are partitioned (ZeRO-3): calls outside ``engine(batch)`` must gather."""
    dtype: torch.dtype
    """The training precision's dtype."""


def apply_speed_switches(method: Method, cfg: RunConfig, device: torch.device) -> None:
    from vitssl.models.speed import (
        compile_blocks,
        fuse_layernorms,
        set_fused_attention,
    )

    attention = cfg.model.attention
    if attention == "auto":
        attention = "math" if device.type == "cpu" else "fused"
    set_fused_attention(method, attention == "fused")
    if cfg.model.fused_layernorm:
        fuse_layernorms(method)
    if cfg.train.compile:
        compile_blocks(method)


def build_engine(
    cfg: RunConfig,
    method: Method,
    world: int,
    device: torch.device,
    resume_path: Path | None = None,
) -> BuiltEngine:
    """Collective (needs the process group): ``method`` wrapped for ``cfg`` at ``world`` ranks.

    ``resume_path``: the checkpoint the run will load; one saved at another world size is
    converted to a universal checkpoint first (rank 0, once) and the engine told so.
    """
    import deepspeed

    ds_config = build_ds_config(cfg, world)
    apply_speed_switches(method, cfg, device)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    peak_lr = cfg.optim.peak_lr(cfg.global_batch(world))
    optimizer = build_optimizer(
        cfg.optim.name,
        method.param_groups(cfg.optim.weight_decay),
        peak_lr,
        cfg.optim.betas,
        cfg.optim.fused,
        cpu_offload=cfg.train.zero == "zero3_offload",
        clip_per_param=cfg.optim.clip_grad if cfg.optim.clip_mode == "per_param" else 0.0,
    )
    if resume_path is not None and needs_universal(resume_path, world):
        ensure_universal(resume_path, dist.get_rank() if dist.is_initialized() else 0)
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    dtype = DTYPES[cfg.train.precision]
    match_norm_buffers(method)
    method.teacher_to(device, dtype)
    return BuiltEngine(engine, ds_config, peak_lr, zero3, dtype)


def match_norm_buffers(model: torch.nn.Module) -> None:
    """Give batch-norm running statistics the dtype of their module's weight.

    DeepSpeed's bf16/fp16 engine casts parameters but leaves buffers as they were (its
    ``buffer_dtype`` would cast every buffer, DINO's float32 centre included), and the CPU
    batch norm refuses bf16 weights with float32 running statistics ("expected scalar type
    BFloat16 but found Float"): every CNN backbone (ResNet, the edge students) failed its
    first step in bf16 on the CPU."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.weight is not None:
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None and buf.dtype != m.weight.dtype:
                    buf.data = buf.data.to(m.weight.dtype)


def gathered_direct_params(method: Method, zero3: bool) -> Any:
    """Under ZeRO-3, gather the parameters no submodule's forward gathers (calls outside
    ``engine(batch)``, such as pictures); a no-op otherwise."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    params = list(method.parameters(recurse=False))
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
