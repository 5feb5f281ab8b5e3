"""Linear probe: learns a separable task; every head sees the same batches."""

from __future__ import annotations

import torch

from vitssl.train.evaluation.config import LinearSection
from vitssl.train.evaluation.linear_probe import lr_factor, train_probe


def _task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 5, generator=torch.Generator().manual_seed(99))
    x = torch.randn(2 * n, 32, generator=gen)
    top2 = (x @ w).topk(2, dim=1)
    keep = (top2.values[:, 0] - top2.values[:, 1] > 0.5).nonzero()[:n, 0]  # a margin
    return x[keep].half(), top2.indices[keep, 0]  # linearly separable by construction


def test_learns_a_linearly_separable_task() -> None:
    xt, yt = _task(2000, 0)
    xv, yv = _task(500, 1)
    s = LinearSection(base_lrs=[0.1, 1.0, 3.0], epochs=30, batch_size=128)
    res = train_probe(xt, yt, xv, yv, 5, s)
    assert res["top1"] > 95.0
    assert len(res["per_lr"]) == 3
    assert res["top1"] == max(r["top1"] for r in res["per_lr"])


def test_deterministic_and_linear_head_lars() -> None:
    xt, yt = _task(300, 0)
    s = LinearSection(base_lrs=[0.5], epochs=3, batch_size=64, head="linear", optimizer="lars")
    a = train_probe(xt, yt, xt, yt, 5, s)
    b = train_probe(xt, yt, xt, yt, 5, s)
    assert a == b


def test_heads_in_one_pass_equal_heads_trained_alone() -> None:
    """One head per lr on shared batches == that head trained on its own (DINO's scheme)."""
    xt, yt = _task(256, 3)
    xv, yv = _task(100, 4)
    both = train_probe(
        xt,
        yt,
        xv,
        yv,
        5,
        LinearSection(base_lrs=[0.05, 2.0], epochs=2, batch_size=32, head="linear"),
    )
    alone = train_probe(
        xt, yt, xv, yv, 5, LinearSection(base_lrs=[0.05], epochs=2, batch_size=32, head="linear")
    )
    assert both["per_lr"][0]["top1"] == alone["per_lr"][0]["top1"]


def test_schedule() -> None:
    assert lr_factor(0, 100, 10) == 0.1
    assert lr_factor(10, 100, 10) == 1.0
    assert abs(lr_factor(55, 100, 10) - 0.5) < 1e-9
