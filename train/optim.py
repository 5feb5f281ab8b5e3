"""Optimizers: AdamW (torch, fused, or DeepSpeed CPU Adam under offload), LARS and LAMB.

Parameter groups come from the method (``Method.param_groups``). ``clip_per_param`` adds
DINO's per-parameter gradient clipping as a step pre-hook (it runs on the gradients the
optimizer is about to apply, after DeepSpeed's accumulation and averaging).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


@torch.no_grad()
def clip_per_parameter_(params: Iterable[torch.Tensor], clip: float) -> list[float]:
    """DINO's ``utils.clip_gradients``: every gradient whose norm exceeds ``clip`` is scaled
    by ``clip / (norm + 1e-6)``, each parameter on its own. Returns the norms before."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        norm = p.grad.norm(2)
        norms.append(float(norm))
        coef = clip / (norm + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    return norms


def _add_per_param_clip(optimizer: torch.optim.Optimizer, clip: float) -> None:
    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        clip_per_parameter_((p for g in opt.param_groups for p in g["params"]), clip)

    optimizer.register_step_pre_hook(hook)


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    fused: bool,
    cpu_offload: bool,
    clip_per_param: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW (torch, fused where asked; DeepSpeed's CPU Adam under offload), LARS or LAMB;
    ``clip_per_param > 0`` clips each parameter's gradient norm before every step (the
    caller makes sure the optimizer sees whole parameters: ZeRO-0, fp32)."""
    optimizer = _build(name, groups, lr, betas, fused, cpu_offload)
    if clip_per_param > 0:
        _add_per_param_clip(optimizer, clip_per_param)
    return optimizer


def _build(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    fused: bool,
    cpu_offload: bool,
) -> torch.optim.Optimizer:
    if name == "adamw":
        if cpu_offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    if name == "lars":
        from vitssl.train.lars import LARS

        return LARS(groups, lr=lr)
    if name == "lamb":
        from timm.optim import Lamb

        # You et al. (2020): bias-corrected Adam direction plus decay, times |w| / |update|;
        # groups without weight decay (norms, biases, tokens) are not adapted, as in the
        # authors' BERT code; no global gradient clipping (optim.clip_grad does that).
        return Lamb(groups, lr=lr, betas=betas, eps=1e-6, weight_decay=0.0, max_grad_norm=None)
    raise ValueError(f"unknown optimizer {name!r}")
