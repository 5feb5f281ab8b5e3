"""k-NN classification on frozen features, chunk by chunk over the bank.

Weighted voting follows DINO's ``eval_knn.py`` (Caron et al., 2021): cosine similarity of
l2-normalised features, the ``k`` most similar bank samples vote for their class with weight
``exp(sim / T)`` (k=20, T=0.07); the class scores are the summed votes. ``weighting="majority"``
gives every neighbour weight one. The bank is never multiplied whole: queries go in blocks and
the bank in chunks, keeping the running top-k per query, so a 1.28M-sample bank fits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTINGS = ("distance", "majority")


def topk_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    chunk_size: int = 65536,
    query_block: int = 1024,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank indices ``(Nq, k)`` of the k nearest bank rows, best first.

    ``queries (Nq, D)`` and ``bank (Nb, D)`` are normalised here (any dtype; compared in fp32).
    """
    if k < 1 or k > bank.shape[0]:
        raise ValueError(f"k={k} must be in 1..{bank.shape[0]} (bank size)")
    device = device or queries.device
    sims_out, idx_out = [], []
    for q0 in range(0, queries.shape[0], query_block):
        q = F.normalize(queries[q0 : q0 + query_block].to(device, torch.float32), dim=1)
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        for b0 in range(0, bank.shape[0], chunk_size):
            b = F.normalize(bank[b0 : b0 + chunk_size].to(device, torch.float32), dim=1)
            s = q @ b.T  # (Bq, Bc)
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            merged_s = torch.cat([best_s, s], dim=1)
            merged_i = torch.cat([best_i, i + b0], dim=1)
            best_s, pos = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
            best_i = merged_i.gather(1, pos)
        sims_out.append(best_s.cpu())
        idx_out.append(best_i.cpu())
    return torch.cat(sims_out), torch.cat(idx_out)


def vote(
    sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    temperature: float = 0.07,
    weighting: str = "distance",
) -> torch.Tensor:
    """Class scores ``(Nq, C)`` from neighbours' similarities and labels ``(Nq, k)``."""
    if weighting == "distance":
        weights = (sims / temperature).exp()
    elif weighting == "majority":
        weights = torch.ones_like(sims)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32)
    return scores.scatter_add_(1, neighbour_labels, weights.float())


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracies in percent; a k above the number of classes counts as all classes."""
    out = {}
    for k in ks:
        pred = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
        correct = (pred == labels.view(-1, 1)).any(dim=1).float().mean()
        out[f"top{k}"] = 100.0 * float(correct)
    return out


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weightings: tuple[str, ...] = WEIGHTINGS,
    chunk_size: int = 65536,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Top-1/top-5 of each weighting: ``{"distance/top1": ..., "majority/top5": ...}``."""
    if int(train_labels.max()) >= num_classes or int(test_labels.max()) >= num_classes:
        raise ValueError(f"a label is >= num_classes={num_classes}")
    sims, idx = topk_neighbours(test_feats, train_feats, k, chunk_size=chunk_size, device=device)
    neighbour_labels = train_labels[idx]  # (Nq, k)
    out: dict[str, float] = {}
    for w in weightings:
        scores = vote(sims, neighbour_labels, num_classes, temperature, w)
        out.update({f"{w}/{m}": v for m, v in topk_accuracy(scores, test_labels).items()})
    return out
