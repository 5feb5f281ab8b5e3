"""Collapse monitors on embeddings ``(B, D)`` of two views of the same images.

* ``std`` / ``std_ratio``: mean per-dimension std of l2-normalised embeddings, and its ratio
  to ``1/sqrt(D)`` (what a uniform spread on the sphere gives); 0 means complete collapse
  (SimSiam paper, Sec. 4.1).
* ``rankme`` / ``rankme_ratio``: effective rank ``exp(entropy(s / |s|_1))`` of the singular
  values (Garrido et al. 2023), and its fraction of the largest possible rank ``min(B, D)``.
* ``alignment``: ``E |z1 - z2|^2`` over positive pairs of normalised embeddings (alpha = 2);
  ``uniformity``: ``log E exp(-2 |zi - zj|^2)`` over distinct pairs (t = 2), averaged over
  the two views (Wang & Isola 2020).

:func:`collapse_warning` flags complete collapse (``std_ratio < 0.1``: all embeddings near
one point) and dimensional collapse (``rankme`` below 1.5, i.e. about one direction, or
below 1 % of ``min(B, D)``). Healthy runs sit well above both (a Gaussian cloud gives
``std_ratio ~ 1`` and ``rankme_ratio ~ 0.5`` or more).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STD_RATIO_MIN = 0.1
"""Below this fraction of ``1/sqrt(D)`` the embeddings have collapsed to a point."""
RANKME_MIN = 1.5
"""An effective rank below this means about one direction is left."""
RANKME_RATIO_MIN = 0.01
"""An effective rank below this fraction of ``min(B, D)`` means dimensional collapse."""


def embedding_std(z: torch.Tensor) -> tuple[float, float]:
    """``(mean std, mean std * sqrt(D))`` of the l2-normalised rows of ``z: (B, D)``."""
    z = F.normalize(z.detach().float(), dim=1)
    std = z.std(dim=0).mean().item()
    return std, std * math.sqrt(z.shape[1])


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``z: (B, D)``: ``exp(-sum p_k log p_k)``, ``p = s / |s|_1 + eps``."""
    s = torch.linalg.svdvals(z.detach().float())  # (min(B, D),)
    p = s / s.sum().clamp_min(1e-30) + eps
    return math.exp(-(p * p.log()).sum().item())


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """``mean_i |z1_i - z2_i|^2`` of the l2-normalised positive pairs."""
    z1 = F.normalize(z1.detach().float(), dim=1)
    z2 = F.normalize(z2.detach().float(), dim=1)
    return (z1 - z2).pow(2).sum(dim=1).mean().item()


def uniformity(z: torch.Tensor) -> float:
    """``log mean_{i<j} exp(-2 |z_i - z_j|^2)`` of the l2-normalised rows."""
    z = F.normalize(z.detach().float(), dim=1)
    sq = torch.pdist(z).pow(2)  # (B (B - 1) / 2,)
    return sq.mul(-2).exp().mean().log().item()


def collapse_metrics(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, float]:
    """All monitors for embeddings ``(B, D)`` of two views; std and rank use the first view."""
    std, std_ratio = embedding_std(z1)
    rank = rankme(z1)
    return {
        "std": std,
        "std_ratio": std_ratio,
        "rankme": rank,
        "rankme_ratio": rank / min(z1.shape),
        "alignment": alignment(z1, z2),
        "uniformity": (uniformity(z1) + uniformity(z2)) / 2,
    }


def collapse_warning(metrics: dict[str, float]) -> str | None:
    """A one-line warning when the metrics of :func:`collapse_metrics` show collapse."""
    if metrics["std_ratio"] < STD_RATIO_MIN:
        return (
            f"embeddings collapsed to a point: std ratio {metrics['std_ratio']:.3g} "
            f"< {STD_RATIO_MIN}"
        )
    if metrics["rankme"] < RANKME_MIN or metrics["rankme_ratio"] < RANKME_RATIO_MIN:
        return (
            f"dimensional collapse: effective rank {metrics['rankme']:.3g} "
            f"({100 * metrics['rankme_ratio']:.2g}% of the maximum)"
        )
    return None
