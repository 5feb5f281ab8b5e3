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
    if name == "lars":
        from train.optimizers import LARS

        return LARS(groups, lr=lr)
    if name == "lamb":
        from timm.optim import Lamb

        # You et al. (2020): bias-corrected Adam direction plus decay, times |w| / |update|;
        # groups without weight decay (norms, biases, tokens) are not adapted, as in the
        # authors' BERT code; no global gradient clipping (optim.clip_grad does that).
        return Lamb(groups, lr=lr, betas=betas, eps=1e-6, weight_decay=0.0, max_grad_norm=None)
    raise ValueError(f"unknown optimizer {name!r}")
