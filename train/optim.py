"""Optimizers: AdamW (torch, fused, or DeepSpeed CPU Adam under offload), LARS and LAMB.

Parameter groups come from the method (``Method.param_groups``).
"""

from __future__ import annotations

from typing import Any

import torch


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
