"""LARS as the self-supervised papers' code runs it (LAMB is timm's: train.optim).

The update is scaled by a trust ratio ``trust_coefficient * |w| / |g + wd * w|``. As in the
SimCLR / BYOL / MoCo v3 / MAE code, parameters with ``ndim <= 1`` (biases, norm gains) are
neither adapted nor decayed; a param group may also set ``"exclude": True`` to treat all
its parameters that way.

Why not ``timm.optim.Lars``: it follows You et al. (2017) instead, and the two differ in what
our recipes use (tests/unit/models/test_lars.py shows both): its ratio divides by
``|g| + wd * |w|`` (not ``|g + wd * w|``, SimCLR's ``lars_optimizer.py`` and MoCo v3's
``LARS``); it adapts only groups with a non-zero weight decay, so MAE's linear probe (LARS
without weight decay, adapted weights) would become plain SGD; and it adapts biases and
norm gains of a decayed group.

Under DeepSpeed, ZeRO stages 1-3 and the bf16 optimizer hand the client optimizer flat
partitions (one tensor per param group and rank) instead of the parameters, so the trust
ratio would be computed over a whole partition, not per layer: use these with ZeRO stage 0
in fp32 (or fp16), where the optimizer sees the real parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


def _excluded(p: torch.Tensor, group: dict[str, Any]) -> bool:
    return p.ndim <= 1 or bool(group.get("exclude", False))


def _trust(w_norm: torch.Tensor, u_norm: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``coefficient * |w| / |u|`` where both norms are positive, else 1."""
    one = torch.ones_like(w_norm)
    ratio = torch.where(u_norm > 0, coefficient * w_norm / u_norm.clamp_min(1e-30), one)
    return torch.where(w_norm > 0, ratio, one)


class LARS(Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), MoCo v3's form:

    ``g = grad + wd * w``; ``g *= eta * |w| / |g|``; ``mu = momentum * mu + g``;
    ``w -= lr * mu`` (excluded parameters skip the decay and the trust ratio).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr, momentum, weight_decay >= 0, trust_coefficient > 0")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                w = p.float()
                if not _excluded(p, group):
                    g = g.add(w, alpha=group["weight_decay"])
                    g = g * _trust(w.norm(), g.norm(), group["trust_coefficient"])
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(g)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(g)
                p.copy_(w.add(mu, alpha=-group["lr"]))
        return loss
