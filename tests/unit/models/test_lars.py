"""LARS and LAMB: steps against a hand computation of the papers' formulas; and why LARS
is ours while LAMB is timm's."""

from __future__ import annotations

import math

import pytest
import torch
from timm.optim import Lars
from torch import nn

from vitssl.train.lars import LARS
from vitssl.train.optim import build_optimizer


def _params() -> tuple[nn.Parameter, nn.Parameter]:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5])
    return w, b


def test_lars_two_steps_by_hand() -> None:
    w, b = _params()
    lr, wd, eta, mom = 0.1, 0.01, 0.001, 0.9
    opt = LARS([w, b], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta)
    opt.step()
    g = [0.6 + wd * 3.0, 0.8 + wd * 4.0]
    trust = eta * 5.0 / math.hypot(*g)
    mu = [trust * x for x in g]
    w_expected = [3.0 - lr * mu[0], 4.0 - lr * mu[1]]
    assert w.tolist()[0] == pytest.approx(w_expected, rel=1e-6)
    assert b.item() == pytest.approx(1.0 - lr * 0.5)  # bias: no decay, no trust ratio
    # second step: momentum accumulates
    opt.step()
    w_norm = math.hypot(*w_expected)
    g2 = [0.6 + wd * w_expected[0], 0.8 + wd * w_expected[1]]
    trust2 = eta * w_norm / math.hypot(*g2)
    mu2 = [mom * mu[i] + trust2 * g2[i] for i in range(2)]
    assert w.tolist()[0] == pytest.approx([w_expected[i] - lr * mu2[i] for i in range(2)], rel=1e-6)
    assert b.item() == pytest.approx(1.0 - lr * 0.5 - lr * (0.9 * 0.5 + 0.5))


def test_lars_excluded_group_and_zero_weights() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    v = nn.Parameter(torch.ones(2, 2))
    v.grad = torch.ones(2, 2)
    opt = LARS([{"params": [w]}, {"params": [v], "exclude": True}], lr=0.1, weight_decay=0.5)
    opt.step()
    torch.testing.assert_close(w, torch.full((2, 2), -0.1))  # |w| = 0: ratio 1
    torch.testing.assert_close(v, torch.full((2, 2), 0.9))  # excluded: plain SGD, no decay


def _lamb(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """LAMB as the trainer builds it (optim.name = "lamb")."""
    return build_optimizer("lamb", groups, lr, (0.9, 0.999), fused=False, cpu_offload=False)


def test_lamb_two_steps_by_hand() -> None:
    """You et al. (2020), Algorithm 2, on a decayed weight; the bias group (no weight decay,
    as Method.param_groups makes it) takes the plain Adam step."""
    w, b = _params()
    lr, wd, eps = 0.01, 0.1, 1e-6
    opt = _lamb([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr)
    opt.step()
    # step 1: bias-corrected moments are g and g^2, so the Adam direction is g / (|g| + eps)
    adam = [0.6 / (0.6 + eps), 0.8 / (0.8 + eps)]
    u = [adam[0] + wd * 3.0, adam[1] + wd * 4.0]
    trust = 5.0 / math.hypot(*u)
    w1 = [3.0 - lr * trust * u[0], 4.0 - lr * trust * u[1]]
    assert w.tolist()[0] == pytest.approx(w1)
    assert b.item() == pytest.approx(1.0 - lr * 0.5 / (0.5 + eps))
    # step 2, same gradient: m = g, v = g^2 again after bias correction
    opt.step()
    u2 = [adam[0] + wd * w1[0], adam[1] + wd * w1[1]]
    trust2 = math.hypot(*w1) / math.hypot(*u2)
    assert w.tolist()[0] == pytest.approx([w1[i] - lr * trust2 * u2[i] for i in range(2)])


def test_timm_lars_is_not_the_ssl_papers_lars() -> None:
    """Why train/lars.py keeps its own LARS (see its docstring)."""
    eta, wd = 0.001, 0.01
    # 1. with weight decay, on a gradient not parallel to the weight: the ratio's denominator
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    w.grad = torch.tensor([[0.8, -0.6]])
    LARS([w], lr=1.0, momentum=0.0, weight_decay=wd, trust_coefficient=eta).step()
    ours = w.detach().clone()
    g = [0.8 + wd * 3.0, -0.6 + wd * 4.0]
    assert ours.tolist()[0] == pytest.approx(
        [3.0 - eta * 5.0 / math.hypot(*g) * g[0], 4.0 - eta * 5.0 / math.hypot(*g) * g[1]]
    )
    v = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    v.grad = torch.tensor([[0.8, -0.6]])
    Lars([v], lr=1.0, momentum=0.0, weight_decay=wd, trust_coeff=eta).step()
    timm_ratio = eta * 5.0 / (1.0 + wd * 5.0 + 1e-8)  # |g| + wd |w|: You et al. (2017)
    assert v.tolist()[0] == pytest.approx([3.0 - timm_ratio * g[0], 4.0 - timm_ratio * g[1]])
    assert abs(v[0, 0].item() - ours[0, 0].item()) > 1e-7
    # 2. without weight decay (MAE's linear probe): ours adapts the weight, timm's does not
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    w.grad = torch.tensor([[0.6, 0.8]])
    LARS([w], lr=1.0, momentum=0.0, trust_coefficient=eta).step()
    assert w.tolist()[0] == pytest.approx([3.0 - eta * 5.0 * 0.6, 4.0 - eta * 5.0 * 0.8])
    v = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    v.grad = torch.tensor([[0.6, 0.8]])
    Lars([v], lr=1.0, momentum=0.0, trust_coeff=eta).step()
    assert v.tolist()[0] == pytest.approx([3.0 - 0.6, 4.0 - 0.8])  # plain SGD


def test_optimizers_update_bf16_parameters() -> None:
    """Ours computes in float32; timm's LAMB keeps bf16 moments (within bf16's resolution).
    The trainer runs both in fp32 only (vitssl.train.config.validate_cross)."""
    makers = {
        "lars": (lambda ps: LARS(ps, lr=0.5, trust_coefficient=1.0), 0.0),
        "lamb": (lambda ps: _lamb(ps, 0.5), 2**-7),
    }
    for make, atol in makers.values():
        p = nn.Parameter(torch.ones(3, 3, dtype=torch.bfloat16))
        p.grad = torch.ones(3, 3, dtype=torch.bfloat16)
        make([{"params": [p], "weight_decay": 0.0}]).step()
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), torch.full((3, 3), 0.5), rtol=0, atol=atol)
