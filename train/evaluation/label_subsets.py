"""Deterministic, per-class stratified label subsets (1 %, 10 %, ... of the labels).

Each class's samples are permuted by a generator seeded from ``(seed, class)`` and the first
``max(1, round(fraction * n_class))`` are kept, so the subsets depend only on the labels and
the seed, keep every class, and are nested (the 1 % subset lies inside the 10 % one).
"""

from __future__ import annotations

import numpy as np
import torch


def stratified_subset(labels: torch.Tensor | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the kept samples."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    kept: list[np.ndarray] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        order = np.random.default_rng([seed, int(c)]).permutation(len(members))
        n = max(1, round(fraction * len(members)))
        kept.append(members[order[:n]])
    return np.sort(np.concatenate(kept))
