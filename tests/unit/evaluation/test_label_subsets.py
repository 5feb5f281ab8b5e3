"""Label subsets: deterministic from the seed, stratified per class, nested."""

from __future__ import annotations

import numpy as np
import pytest

from vitssl.train.evaluation.label_subsets import stratified_subset


@pytest.fixture
def labels() -> np.ndarray:
    counts = [500, 300, 200, 1000]
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(0).permutation(y)


def test_deterministic(labels: np.ndarray) -> None:
    a, b = stratified_subset(labels, 0.1, seed=3), stratified_subset(labels, 0.1, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, stratified_subset(labels, 0.1, seed=4))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_stratified(labels: np.ndarray, fraction: float) -> None:
    sel = stratified_subset(labels, fraction, seed=0)
    assert len(np.unique(sel)) == len(sel) and np.all(np.diff(sel) > 0)
    for c, n in enumerate([500, 300, 200, 1000]):
        assert (labels[sel] == c).sum() == max(1, round(fraction * n))


def test_nested_and_full(labels: np.ndarray) -> None:
    one, ten = stratified_subset(labels, 0.01, 0), stratified_subset(labels, 0.1, 0)
    assert set(one) <= set(ten)
    assert np.array_equal(stratified_subset(labels, 1.0, 0), np.arange(len(labels)))


def test_bad_fraction(labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        stratified_subset(labels, 0.0, 0)
