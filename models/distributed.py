"""Collectives that the losses need, each a no-op when torch.distributed is not running.

* :func:`gather_with_grad`: all-gather along dim 0 whose backward all-reduces the incoming
  gradient and returns this rank's slice (so negatives from other ranks pass their gradient
  back to the rank that computed them; gloo has no reduce-scatter, hence all-reduce).
* :func:`gather_no_grad`: all-gather of tensors that need no gradient (MoCo keys).
* :func:`all_reduce_sum_with_grad`: a sum over ranks whose backward is again a sum over ranks
  (global batch-norm statistics).
* :func:`all_reduce_mean_`: in-place mean over ranks, no gradient (DINO's center).

Every rank must hold a tensor of the same shape.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W * B, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss used our rows: their gradients add up.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (W * B, ...)`` in rank order; gradients flow back to each rank's rows."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (W * B, ...)`` in rank order, without gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks; the backward sums the gradient over ranks as well."""
    if world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


@torch.no_grad()
def all_reduce_(x: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """Replace ``x`` by its ``op`` (``"sum"`` or ``"max"``) over ranks, in place; returns ``x``."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    """Replace ``x`` by its mean over ranks, in place; returns ``x``."""
    return all_reduce_(x).div_(world_size())
