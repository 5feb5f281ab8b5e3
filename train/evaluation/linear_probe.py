"""Linear probing of a frozen encoder: several learning rates trained together in one pass.

As DINO's ``eval_linear.py`` does, one head per learning rate is trained on the very same
batches (one optimizer, one parameter group per head); the best head on the validation set
is reported (DINO's protocol: the grid is chosen on the evaluation set itself, so the number
is an upper bound). The head is MAE's ``BatchNorm1d(affine=False) + Linear`` (``bn_linear``)
or a plain ``Linear``; the optimizer SGD with momentum 0.9 (DINO) or LARS (MAE), with a
linear warm-up then cosine decay per step; the learning rate of a head is
``base_lr * batch_size / 256``.

Features are cached by default (:func:`train_probe` on tensors); ``on_the_fly`` re-encodes
augmented images every epoch (:func:`train_probe_on_the_fly`), for data too large to cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vitssl.train.evaluation.config import LinearSection
from vitssl.train.evaluation.knn import topk_accuracy


def make_head(kind: str, dim: int, num_classes: int) -> nn.Module:
    """``linear`` or ``bn_linear`` (checked by :class:`LinearSection`)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)  # MAE's linear-probe init
    nn.init.zeros_(linear.bias)
    if kind == "linear":
        return linear
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


class MultiHead(nn.Module):
    """One head per learning rate; ``forward`` gives logits ``(H, B, C)``."""

    def __init__(self, kind: str, dim: int, num_classes: int, count: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(make_head(kind, dim, num_classes) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(x) for h in self.heads])


def _optimizer(heads: MultiHead, s: LinearSection) -> tuple[torch.optim.Optimizer, list[float]]:
    peaks = [lr * s.batch_size / 256 for lr in s.base_lrs]
    groups = [
        {"params": list(h.parameters()), "lr": lr, "weight_decay": s.weight_decay}
        for h, lr in zip(heads.heads, peaks, strict=True)
    ]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=peaks[0], momentum=0.9), peaks
    from vitssl.train.lars import LARS

    return LARS(groups, lr=peaks[0]), peaks


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then half-cosine to zero, as a fraction of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_loop(
    heads: MultiHead,
    s: LinearSection,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    sync: Callable[[MultiHead], None] | None = None,
) -> None:
    opt, peaks = _optimizer(heads, s)
    total, warmup = s.epochs * steps_per_epoch, s.warmup_epochs * steps_per_epoch
    step = 0
    heads.train()
    for epoch in range(s.epochs):
        for x, y in batches(epoch):
            f = lr_factor(step, total, warmup)
            for g, peak in zip(opt.param_groups, peaks, strict=True):
                g["lr"] = peak * f
            logits = heads(x.float())  # (H, B, C)
            # summed over heads: each head's gradient is its own loss's gradient
            loss = sum(F.cross_entropy(lg, y) for lg in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            if sync is not None:
                sync(heads)
            opt.step()
            step += 1


@torch.no_grad()
def _evaluate(
    heads: MultiHead, feats: torch.Tensor, labels: torch.Tensor, s: LinearSection
) -> dict:
    heads.eval()
    logits = torch.cat(
        [heads(feats[i : i + 4096].float()) for i in range(0, feats.shape[0], 4096)], dim=1
    )  # (H, N, C)
    per_lr = []
    for lr, lg in zip(s.base_lrs, logits, strict=True):
        acc = topk_accuracy(lg, labels)
        per_lr.append({"base_lr": lr, **acc})
    best = max(per_lr, key=lambda r: (r["top1"], r["top5"]))
    return {
        "top1": best["top1"],
        "top5": best["top5"],
        "best_base_lr": best["base_lr"],
        "per_lr": per_lr,
    }


def train_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    settings: LinearSection,
    seed: int = 0,
) -> dict:
    """Train the heads on cached features; top-1/top-5 of the best learning rate on val.

    Deterministic from ``seed``: every rank computes the same result.
    """
    n = train_feats.shape[0]
    if int(train_labels.max()) >= num_classes or int(val_labels.max()) >= num_classes:
        raise ValueError(f"a label is >= num_classes={num_classes}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = MultiHead(settings.head, train_feats.shape[1], num_classes, len(settings.base_lrs))
    bs = min(settings.batch_size, n)
    steps = n // bs  # drop the last partial batch (BatchNorm needs > 1 sample)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(n, generator=gen)
        for i in range(steps):
            sel = perm[i * bs : (i + 1) * bs]
            yield train_feats[sel], train_labels[sel]

    _train_loop(heads, settings, batches, steps)
    return _evaluate(heads, val_feats, val_labels, settings)


def train_probe_on_the_fly(
    encode: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Callable[[int], Iterable[dict]],
    steps_per_epoch: int,
    dim: int,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    settings: LinearSection,
    seed: int = 0,
) -> dict:
    """Heads trained on freshly encoded (augmented) batches; gradients averaged over ranks."""
    import torch.distributed as dist

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = MultiHead(settings.head, dim, num_classes, len(settings.base_lrs))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def sync(h: MultiHead) -> None:
        if not distributed:
            return
        for p in h.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for b in train_batches(epoch):
            with torch.no_grad():
                x = encode(b["views"][0]).float()
            y = b["label"]
            if int(y.max()) >= num_classes:
                raise ValueError(f"label {int(y.max())} >= num_classes={num_classes}")
            yield x, y

    _train_loop(heads, settings, batches, steps_per_epoch, sync)
    if distributed:  # BatchNorm running statistics: the mean over ranks
        for buf in heads.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= dist.get_world_size()
    return _evaluate(heads, val_feats, val_labels, settings)
