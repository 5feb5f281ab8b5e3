"""Collapse monitors: values against direct formulas, warnings on collapsed embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from vitssl.models.collapse import (
    alignment,
    collapse_metrics,
    collapse_warning,
    embedding_std,
    rankme,
    uniformity,
)


def test_values_match_direct_formulas() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 6), torch.randn(16, 6)
    n1 = z1 / z1.norm(dim=1, keepdim=True)
    n2 = z2 / z2.norm(dim=1, keepdim=True)
    std = float(n1.std(dim=0).mean())
    assert embedding_std(z1) == pytest.approx((std, std * math.sqrt(6)), rel=1e-5)
    s = torch.linalg.svdvals(z1)
    p = s / s.sum() + 1e-7
    assert rankme(z1) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    align = sum(float(((n1[i] - n2[i]) ** 2).sum()) for i in range(16)) / 16
    assert alignment(z1, z2) == pytest.approx(align, rel=1e-5)
    pairs = [
        math.exp(-2 * float(((n1[i] - n1[j]) ** 2).sum()))
        for i in range(16)
        for j in range(i + 1, 16)
    ]
    assert uniformity(z1) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)


def test_rankme_of_known_spectra() -> None:
    assert rankme(torch.eye(8)) == pytest.approx(8.0, rel=1e-4)
    rank_one = torch.outer(torch.randn(10), torch.randn(5))
    assert rankme(rank_one) == pytest.approx(1.0, abs=1e-3)


def test_constant_embeddings_warn() -> None:
    z = torch.ones(32, 16) + 1e-6 * torch.randn(32, 16)
    metrics = collapse_metrics(z, z.clone())
    assert metrics["std_ratio"] < 0.01
    msg = collapse_warning(metrics)
    assert msg is not None and "collapsed" in msg


def test_dimensional_collapse_warns() -> None:
    torch.manual_seed(0)
    # Rows +-u: two antipodal points, so the std stays high but only one direction is left.
    z = torch.randn(64, 1) @ torch.randn(1, 32)
    metrics = collapse_metrics(z, z)
    assert metrics["std_ratio"] > 0.1
    msg = collapse_warning(metrics)
    assert msg is not None and "dimensional" in msg


def test_gaussian_embeddings_do_not_warn() -> None:
    torch.manual_seed(0)
    metrics = collapse_metrics(torch.randn(64, 32), torch.randn(64, 32))
    assert metrics["std_ratio"] == pytest.approx(1.0, abs=0.1)
    assert metrics["rankme_ratio"] > 0.5
    assert collapse_warning(metrics) is None
