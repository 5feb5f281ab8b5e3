"""Schedules as pure functions of the step, so that resume is exact by construction."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine down to ``floor``.

    ``step`` counts completed optimizer steps: the value is used for step ``step + 1``.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_between(start: float, end: float, progress: float) -> float:
    """``end + (start - end) * (1 + cos(pi * progress)) / 2``: ``start`` at 0, ``end`` at 1
    (DINO's weight-decay schedule rises 0.04 -> 0.4 this way)."""
    p = min(1.0, max(0.0, progress))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
