"""k-NN against a brute-force reference (full similarity matrix, full sort, python votes)."""

from __future__ import annotations

import math

import pytest
import torch

from vitssl.train.evaluation.knn import knn_classify, topk_accuracy, topk_neighbours, vote


def reference_scores(
    train: torch.Tensor,
    train_y: torch.Tensor,
    test: torch.Tensor,
    k: int,
    t: float,
    c: int,
    weighting: str,
) -> torch.Tensor:
    """DINO's eval_knn written plainly: one query at a time, float64, sorted lists."""
    out = torch.zeros(test.shape[0], c, dtype=torch.float64)
    tr = train.double() / train.double().norm(dim=1, keepdim=True)
    te = test.double() / test.double().norm(dim=1, keepdim=True)
    for i in range(te.shape[0]):
        sims = [(float(te[i] @ tr[j]), j) for j in range(tr.shape[0])]
        sims.sort(key=lambda s: -s[0])
        for s, j in sims[:k]:
            out[i, int(train_y[j])] += math.exp(s / t) if weighting == "distance" else 1.0
    return out


def test_separable_toy_embedding_is_classified_perfectly() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10  # four orthogonal class directions
    train_y = torch.arange(4).repeat_interleave(30)
    test_y = torch.arange(4).repeat_interleave(10)
    train = centres[train_y] + 0.5 * torch.randn(120, 16, generator=gen)
    test = centres[test_y] + 0.5 * torch.randn(40, 16, generator=gen)
    res = knn_classify(train.half(), train_y, test.half(), test_y, 4, k=20, chunk_size=7)
    assert res["distance/top1"] == 100.0
    assert res["majority/top1"] == 100.0
    assert res["distance/top5"] == 100.0


@pytest.mark.parametrize("weighting", ["distance", "majority"])
@pytest.mark.parametrize("chunk", [5, 64, 1000])
def test_chunked_scores_match_brute_force(weighting: str, chunk: int) -> None:
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(150, 8, generator=gen), torch.randn(23, 8, generator=gen)
    train_y = torch.randint(0, 6, (150,), generator=gen)
    sims, idx = topk_neighbours(test, train, 20, chunk_size=chunk, query_block=7)
    ours = vote(sims, train_y[idx], 6, 0.07, weighting)
    ref = reference_scores(train, train_y, test, 20, 0.07, 6, weighting)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


def test_neighbours_are_the_full_sort() -> None:
    gen = torch.Generator().manual_seed(2)
    bank, q = torch.randn(97, 5, generator=gen), torch.randn(11, 5, generator=gen)
    sims, idx = topk_neighbours(q, bank, 9, chunk_size=10)
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    ref_s, ref_i = full.topk(9, dim=1)
    torch.testing.assert_close(sims, ref_s)
    assert torch.equal(idx, ref_i)


def test_topk_accuracy_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)


def test_label_outside_classes_is_refused() -> None:
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(x, torch.full((10,), 3), x, torch.zeros(10, dtype=torch.long), 3, k=2)
