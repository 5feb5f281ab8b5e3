"""Projection / prediction heads, DINO's head, and batch norm synchronised across ranks.

* :func:`projection_mlp`: ``Linear-BN-ReLU`` x (n-1) then ``Linear`` (+ optional BN), the
  projectors and predictors of SimCLR, MoCo v3, BYOL and SimSiam.
* :class:`DINOHead`: MLP with GELU, bottleneck, l2-normalisation and a weight-normalised last
  layer (explicit ``v / |v|`` rather than a parametrization, so DeepSpeed sees plain tensors).
* :class:`SyncBatchNorm` and :func:`maybe_sync_batchnorm`: ``nn.SyncBatchNorm`` refuses CPU
  tensors (torch 2.14: "expected input tensor to be on GPU"), so on CPU (gloo) ours computes
  the global statistics with a differentiable all-reduce; on GPU it defers to torch's kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitssl.models.distributed import all_reduce_sum_with_grad, world_size


def projection_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    last_bn: bool,
    last_bn_affine: bool = True,
) -> nn.Sequential:
    """``num_layers`` linear layers; the hidden ones are ``Linear-BN-ReLU``.

    Linear layers followed by a batch norm have no bias (the norm cancels it). ``last_bn`` adds
    a batch norm after the output layer (SimCLR v2, MoCo v3 and SimSiam projectors), affine
    or not (MoCo v3 and SimSiam use ``affine=False``).
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head: ``MLP -> l2-normalise -> weight-normalised Linear(K)``.

    With ``norm_last_layer`` the last layer's rows are unit vectors (weight_g fixed to 1); else
    a learnable per-row gain ``weight_g`` (initialised to 1) scales them.

    ``last_layer_frozen``: while True the last layer's weights are detached in the forward, so
    no gradient reaches them (DINO freezes them during the first epoch). Detaching, rather
    than toggling ``requires_grad``, keeps the parameter set that DeepSpeed partitioned and
    registered with the optimizer unchanged; the optimizer then sees a zero (DeepSpeed) or
    absent (plain torch) gradient.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the DINO head needs at least one layer, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.weight_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))
        self.last_layer_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck)
        v: torch.Tensor = self.weight_v
        g: torch.Tensor | None = self.weight_g
        if self.last_layer_frozen:
            v = v.detach()
            g = None if g is None else g.detach()
        w = F.normalize(v, dim=1)  # (K, bottleneck), unit rows
        if g is not None:
            w = w * g
        return F.linear(x, w)  # (B, K)


class SyncBatchNorm(nn.SyncBatchNorm):
    """Batch norm over the global batch; also on CPU, where torch's SyncBatchNorm refuses.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d/2d``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1 and input.device.type == "cpu"):
            return super().forward(input)
        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = x.numel() // c
        local = torch.cat([x.sum(dims), (x * x).sum(dims)])  # (2C,)
        total = all_reduce_sum_with_grad(local)
        n = count * world_size()
        mean = total[:c] / n
        var = (total[c:] / n - mean * mean).clamp_min(0)  # biased, used to normalise
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None and self.running_var is not None
                self.num_batches_tracked.add_(1)
                factor = self.momentum
                if factor is None:
                    factor = 1.0 / float(self.num_batches_tracked.item())
                unbiased = var * n / max(1, n - 1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(input.dtype)


def maybe_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by :class:`SyncBatchNorm` when more than one rank runs.

    Call it after the process group starts and before DeepSpeed wraps the model; with one
    process it returns ``module`` unchanged. Returns the (possibly new) root module.
    """
    if world_size() == 1:
        return module
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, nn.SyncBatchNorm
    ):
        new = SyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        new.weight, new.bias = module.weight, module.bias  # the same tensors: device, dtype kept
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = _convert(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
