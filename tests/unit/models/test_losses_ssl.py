"""The SSL losses against explicit, loop-based computations of the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitssl.models.losses import (
    dino_loss,
    info_nce_loss,
    negative_cosine_loss,
    normalized_mse_loss,
    nt_xent_loss,
    sinkhorn_knopp,
)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_nt_xent_matches_loop_over_pairs() -> None:
    torch.manual_seed(0)
    b, tau = 5, 0.3
    z1, z2 = torch.randn(b, 8), torch.randn(b, 8)
    views = list(z1) + list(z2)  # 2B vectors; partner of i is (i + B) mod 2B
    n = len(views)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        denom = sum(math.exp(_cos(views[i], views[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(_cos(views[i], views[j]) / tau) / denom)
    expected = total / n
    got = nt_xent_loss(z1, z2, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_perfect_alignment_is_small_and_bf16_inputs_give_float32() -> None:
    z = F.one_hot(torch.arange(4), 4).float()
    assert nt_xent_loss(z, z, 0.05).item() < 1e-6
    out = nt_xent_loss(z.bfloat16(), z.bfloat16(), 0.05)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("queue_size", [0, 3])
def test_info_nce_matches_loop(queue_size: int) -> None:
    torch.manual_seed(1)
    b, tau = 4, 0.2
    q, k = torch.randn(b, 6), torch.randn(b, 6)
    queue = torch.randn(queue_size, 6) if queue_size else None
    negatives = list(k) + (list(queue) if queue is not None else [])
    total = 0.0
    for i in range(b):
        denom = sum(math.exp(_cos(q[i], key) / tau) for key in negatives)
        total += -math.log(math.exp(_cos(q[i], k[i]) / tau) / denom)
    expected = total / b * 2 * tau
    assert info_nce_loss(q, k, tau, queue).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_gives_no_gradient_to_keys() -> None:
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    info_nce_loss(q, k, 0.2).backward()
    assert q.grad is not None and k.grad is None


def test_byol_and_simsiam_losses_match_formulas() -> None:
    torch.manual_seed(2)
    p, z = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    pd, zd = p.detach(), z.detach()
    mse = sum(float(((pd[i] / pd[i].norm() - zd[i] / zd[i].norm()) ** 2).sum()) for i in range(6))
    mse /= 6
    assert normalized_mse_loss(p, z).item() == pytest.approx(mse, rel=1e-5)
    cos = sum(_cos(pd[i], zd[i]) for i in range(6)) / 6
    loss = negative_cosine_loss(p, z)
    assert loss.item() == pytest.approx(-cos, rel=1e-5)
    loss.backward()
    assert z.grad is None and p.grad is not None  # stop-gradient on the target


def test_dino_loss_matches_explicit_cross_entropy_over_pairs() -> None:
    torch.manual_seed(3)
    b, k, crops, tau_s = 3, 7, 4, 0.1
    student = [torch.randn(b, k) for _ in range(crops)]
    teacher = [torch.softmax(torch.randn(b, k) / 0.04, dim=-1) for _ in range(2)]
    terms = []
    for iq in range(2):
        for v in range(crops):
            if v == iq:
                continue
            per_sample = []
            for s in range(b):
                logits = student[v][s] / tau_s
                log_p = logits - torch.logsumexp(logits, dim=0)
                per_sample.append(-sum(teacher[iq][s, j] * log_p[j] for j in range(k)))
            terms.append(sum(per_sample) / b)
    expected = float(sum(terms) / len(terms))
    assert len(terms) == 2 * crops - 2
    assert dino_loss(student, teacher, tau_s).item() == pytest.approx(expected, rel=1e-5)


def _sinkhorn_reference(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp spelt out in float64 with explicit loops over prototypes and samples."""
    q = [[math.exp(v / temperature) for v in row] for row in logits.double().tolist()]  # B x K
    b, k = len(q), len(q[0])
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):  # each prototype gets mass 1 / K
            col = sum(q[i][j] for i in range(b))
            for i in range(b):
                q[i][j] /= col * k
        for i in range(b):  # each sample gets mass 1 / B
            row = sum(q[i])
            q[i] = [v / (row * b) for v in q[i]]
    return torch.tensor(q, dtype=torch.float64) * b


def test_sinkhorn_knopp_matches_explicit_normalisation_and_balances_prototypes() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g)
    got = sinkhorn_knopp(logits, 0.3, iterations=3)
    ref = _sinkhorn_reference(logits, 0.3, 3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(6))  # rows: distributions
    # After many rounds every prototype holds B / K of the batch's mass, whatever the logits,
    # even when every sample prefers prototype 0 (which a softmax would give to all of them).
    skewed = torch.randn(6, 4, generator=g) * 0.1
    skewed[:, 0] += 5.0
    balanced = sinkhorn_knopp(skewed, 0.1, iterations=200)
    torch.testing.assert_close(balanced.sum(0), torch.full((4,), 6 / 4), rtol=1e-4, atol=1e-4)
    assert torch.softmax(skewed / 0.1, dim=1)[:, 0].min() > 0.99


def test_sinkhorn_knopp_survives_logits_whose_exp_overflows() -> None:
    logits = torch.tensor([[1.0, -1.0, 0.5], [0.9, -0.8, 0.4]])
    out = sinkhorn_knopp(logits, 0.005, iterations=3)  # exp(200) overflows float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(2))
