"""Distillation losses against independent float64 NumPy computations, and the queue."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitssl.models.distill_losses import (
    EmbeddingQueue,
    feature_loss,
    logit_loss,
    patch_loss,
    relational_loss,
)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_feature_losses() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), 3 * torch.randn(5, 7, generator=g)
    cos = np.mean([1 - _unit(a) @ _unit(b) for a, b in zip(_np(s), _np(t), strict=True)])
    assert float(feature_loss(s, t, "cosine")) == pytest.approx(cos, rel=1e-5)
    d = np.abs(_np(s) - _np(t))
    smooth = np.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    assert float(feature_loss(s, t, "smooth_l1")) == pytest.approx(smooth, rel=1e-5)
    assert float(feature_loss(t, t, "cosine")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feature loss"):
        feature_loss(s, t, "l2")


def test_feature_loss_gradient_reaches_only_the_student() -> None:
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    feature_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_relational_loss_is_seed_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    s, t, q = (torch.randn(n, 6, generator=g) for n in (4, 4, 9))
    tau_s, tau_t = 0.2, 0.05
    ss, tt, qq = _unit(_np(s)), _unit(_np(t)), _unit(_np(q))
    total = 0.0
    for i in range(4):
        anchors = np.vstack([tt[i], qq])  # the sample's own teacher embedding, then the queue
        ls = anchors @ ss[i] / tau_s
        lt = anchors @ tt[i] / tau_t
        p_t = np.exp(lt - lt.max()) / np.exp(lt - lt.max()).sum()
        log_p_s = ls - ls.max() - math.log(np.exp(ls - ls.max()).sum())
        total += -(p_t * log_p_s).sum()
    got = relational_loss(s, t, q, tau_s, tau_t)
    assert float(got) == pytest.approx(total / 4, rel=1e-5)


def test_relational_loss_with_empty_queue_is_zero() -> None:
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    assert float(relational_loss(s, t, torch.zeros(0, 4), 0.2, 0.01)) == pytest.approx(0.0)


def _bilinear(x: np.ndarray, out: int) -> np.ndarray:
    """align_corners=False bilinear resize of ``x: (C, n, n)`` to ``(C, out, out)``."""
    n = x.shape[1]

    def taps(j: int) -> tuple[int, int, float]:
        src = max((j + 0.5) * n / out - 0.5, 0.0)
        i0 = min(math.floor(src), n - 1)
        return i0, min(i0 + 1, n - 1), src - i0

    y = np.zeros((x.shape[0], out, out))
    for a in range(out):
        r0, r1, fr = taps(a)
        for b in range(out):
            c0, c1, fc = taps(b)
            top = (1 - fc) * x[:, r0, c0] + fc * x[:, r0, c1]
            bottom = (1 - fc) * x[:, r1, c0] + fc * x[:, r1, c1]
            y[:, a, b] = (1 - fr) * top + fr * bottom
    return y


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_patch_loss_resizes_bilinearly_to_the_teacher_grid(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    fmap = torch.randn(2, 5, 2, 2, generator=g)  # student map 2x2, width 5
    tokens = torch.randn(2, 16, 5, generator=g)  # teacher grid 4x4
    expected = []
    for b in range(2):
        up = _bilinear(_np(fmap[b]), 4).reshape(5, 16).T  # (16 tokens, 5), row-major
        tb = _np(tokens[b])
        if kind == "cosine":
            expected += [1 - _unit(u) @ _unit(v) for u, v in zip(up, tb, strict=True)]
        else:
            expected += list(((up - tb) ** 2).mean(axis=1))
    got = patch_loss(fmap, tokens, (4, 4), kind)
    assert float(got) == pytest.approx(float(np.mean(expected)), rel=1e-5)


def test_patch_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="teacher tokens"):
        patch_loss(torch.randn(1, 5, 2, 2), torch.randn(1, 9, 5), (4, 4))


def test_logit_loss_is_temperature_scaled_kl() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    temp = 4.0

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp_s, lp_t = log_softmax(_np(s) / temp), log_softmax(_np(t) / temp)
    kl = (np.exp(lp_t) * (lp_t - lp_s)).sum(axis=1).mean() * temp**2
    assert float(logit_loss(s, t, temp)) == pytest.approx(kl, rel=1e-5)
    assert float(logit_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def test_queue_is_a_fifo_ring_and_round_trips() -> None:
    q = EmbeddingQueue(5, 2)
    assert q.anchors(torch.zeros(1)).shape == (0, 2)
    q.push(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert q.anchors(torch.zeros(1))[:, 0].tolist() == [1, 2, 3]
    q.push(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))  # wraps: 6 overwrites 1
    assert q.filled == 5 and q.ptr == 1
    assert q.anchors(torch.zeros(1))[:, 0].tolist() == [6, 2, 3, 4, 5]
    q.push(torch.arange(14.0).view(7, 2))  # more than the queue: the newest 5 rows stay
    assert sorted(q.data[:, 0].tolist()) == [4, 6, 8, 10, 12]
    r = EmbeddingQueue(5, 2)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.data, q.data) and (r.ptr, r.filled) == (q.ptr, q.filled)
    with pytest.raises(ValueError, match="saved queue"):
        EmbeddingQueue(4, 2).load_state_dict(q.state_dict())
