"""The training losses of the joint-embedding methods, as small pure functions.

Every function computes in float32 whatever dtype its inputs have, and returns a scalar.
The contrastive losses gather their negatives from every rank (models.distributed); each
rank's loss is the mean over its own anchors, so the mean over ranks (what data-parallel
gradient averaging optimises) is the loss of the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitssl.models.distributed import (
    all_reduce_,
    gather_no_grad,
    gather_with_grad,
    rank,
    world_size,
)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2N views must find its partner among the other 2N - 1.

    ``z1, z2: (B, D)`` are the projections of the two views on this rank; the negatives are
    the views of every rank (gathered with gradient). Returns the mean over the 2B anchors.
    """
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    all1 = gather_with_grad(z1)  # (N, D), N = W * B
    all2 = gather_with_grad(z2)
    b = z1.shape[0]
    labels = torch.arange(b, device=z1.device) + rank() * b  # (B,) global index of each anchor
    self_mask = F.one_hot(labels, all1.shape[0]).bool()  # (B, N): an anchor is not its negative
    losses = []
    for anchor, same, other in ((z1, all1, all2), (z2, all2, all1)):
        pos_and_cross = anchor @ other.T / temperature  # (B, N): partner at `labels`
        within = (anchor @ same.T / temperature).masked_fill(self_mask, float("-inf"))  # (B, N)
        logits = torch.cat([pos_and_cross, within], dim=1)  # (B, 2N)
        losses.append(F.cross_entropy(logits, labels))
    return (losses[0] + losses[1]) / 2


def info_nce_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float,
    queue: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo v3's contrastive loss, scaled by ``2 * temperature`` as in the authors' code.

    ``q: (B, D)`` queries of this rank; ``k: (B, D)`` keys of this rank (no gradient), gathered
    so that every rank's keys are negatives; ``queue: (K, D)`` optional extra negatives
    (MoCo v2's memory of past keys). The positive of query ``i`` is its own key.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    keys = gather_no_grad(k)  # (N, D)
    if queue is not None:
        keys = torch.cat([keys, F.normalize(queue.float(), dim=1)], dim=0)  # (N + K, D)
    logits = q @ keys.T / temperature  # (B, N [+ K])
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def normalized_mse_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)``, mean over the batch; ``z`` is a target."""
    cos = F.cosine_similarity(p.float(), z.detach().float(), dim=1)  # (B,)
    return (2 - 2 * cos).mean()


def negative_cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``-cos(p, stopgrad(z))``, mean over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def dino_loss(
    student_logits: list[torch.Tensor],
    teacher_probs: list[torch.Tensor],
    student_temp: float,
) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's distribution for each global crop and the
    student's distribution for every *other* crop, averaged over those pairs.

    ``student_logits``: one ``(B, K)`` per crop, global crops first (they share indices with
    ``teacher_probs``: one ``(B, K)`` per global crop, already centred, sharpened, softmaxed).
    """
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total = torch.zeros((), device=student_logits[0].device)
    pairs = 0
    for iq, q in enumerate(teacher_probs):
        for v, lp in enumerate(log_p):
            if v == iq:
                continue
            total = total + torch.sum(-q.detach().float() * lp, dim=-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("DINO needs at least two crops")
    return total / pairs


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets balanced over the prototypes (SwAV; DINOv2's teacher centering).

    ``logits``: ``(B, K)`` on this rank. Returns ``(B, K)`` rows that sum to 1, found by
    ``iterations`` alternate normalisations of ``Q = exp(logits / temperature)`` so that over
    the global batch (all ranks) every prototype receives the same mass ``1 / K`` and every
    sample ``1 / B_global``. Unlike an EMA center, it cannot collapse to one prototype nor
    flatten to uniform, even at the first step, where a fresh network's outputs barely differ.
    """
    if iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least one iteration, got {iterations}")
    x = logits.float() / temperature
    # (K, B); the global max keeps exp finite and cancels in the normalisations
    q = torch.exp(x - all_reduce_(x.max(), op="max")).t()
    k, b = q.shape[0], q.shape[1] * world_size()
    tiny = torch.finfo(torch.float32).tiny  # a prototype whose mass underflowed stays 0
    q /= all_reduce_(q.sum()).clamp_min(tiny)
    for _ in range(iterations):
        q /= all_reduce_(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype: 1 / K
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample (a local column): 1 / B
        q /= b
    return (q * b).t()  # (B, K), rows sum to 1
