"""Optimizers and their parameter groups (no weight decay on norms, biases and tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str]) -> list[dict[str, Any]]:
    """Two groups (decay / no decay) of the trainable parameters, in a stable order."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in no_decay_names or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    fused: bool,
    cpu_offload: bool,
) -> torch.optim.Optimizer:
    """AdamW (torch, fused where asked; DeepSpeed's CPU Adam under offload), LARS or LAMB."""
    if name == "adamw":
        if cpu_offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    from train.optimizers import LAMB, LARS

    if name == "lars":
        return LARS(groups, lr=lr)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}")
