"""LARS and LAMB: one step against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from train.optimizers import LAMB, LARS


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


def test_lamb_one_step_by_hand() -> None:
    w, b = _params()
    lr, wd, eps = 0.01, 0.1, 1e-6
    opt = LAMB([w, b], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd)
    opt.step()
    # step 1: bias-corrected moments are g and g^2, so the Adam direction is g / (|g| + eps)
    adam = [0.6 / (0.6 + eps), 0.8 / (0.8 + eps)]
    u = [adam[0] + wd * 3.0, adam[1] + wd * 4.0]
    trust = 5.0 / math.hypot(*u)
    assert w.tolist()[0] == pytest.approx([3.0 - lr * trust * u[0], 4.0 - lr * trust * u[1]])
    assert b.item() == pytest.approx(1.0 - lr * 0.5 / (0.5 + eps))


def test_optimizers_update_bf16_parameters() -> None:
    for opt in (LARS, LAMB):
        p = nn.Parameter(torch.ones(3, 3, dtype=torch.bfloat16))
        p.grad = torch.ones(3, 3, dtype=torch.bfloat16)
        kwargs = {"trust_coefficient": 1.0} if opt is LARS else {}
        opt([p], lr=0.5, **kwargs).step()
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), torch.full((3, 3), 0.5))
