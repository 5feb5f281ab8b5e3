"""Projection MLPs, DINO's head and the CPU-capable SyncBatchNorm (single process here)."""

from __future__ import annotations

import torch
from torch import nn

from vitssl.models.heads import DINOHead, SyncBatchNorm, maybe_sync_batchnorm, projection_mlp


def test_projection_mlp_layout() -> None:
    mlp = projection_mlp(8, 16, 4, num_layers=3, last_bn=True, last_bn_affine=False)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"
    ]  # fmt: skip
    assert mlp[0].bias is None and mlp[6].bias is None and mlp[7].weight is None
    plain = projection_mlp(8, 16, 4, num_layers=2, last_bn=False)
    assert plain[-1].bias is not None
    assert plain(torch.randn(5, 8)).shape == (5, 4)


def test_dino_head_rows_are_unit_vectors_and_frozen_last_layer_gets_no_grad() -> None:
    torch.manual_seed(0)
    head = DINOHead(12, 30, hidden_dim=16, bottleneck_dim=8, num_layers=3)
    x = torch.randn(4, 12)
    bottleneck = nn.functional.normalize(head.mlp(x), dim=-1)
    w = head.weight_v / head.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), bottleneck @ w.T)
    head.last_layer_frozen = True
    head(x).sum().backward()
    assert head.weight_v.grad is None
    assert head.mlp[0].weight.grad is not None
    head.last_layer_frozen = False
    head(x).sum().backward()
    assert head.weight_v.grad is not None and head.weight_v.grad.abs().sum() > 0


def test_dino_head_without_norm_last_layer_learns_a_gain() -> None:
    head = DINOHead(12, 30, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    assert head.weight_g is not None
    head(torch.randn(3, 12)).sum().backward()
    assert head.weight_g.grad is not None


def test_maybe_sync_batchnorm_is_a_no_op_in_one_process() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert maybe_sync_batchnorm(model) is model
    assert type(model[1]) is nn.BatchNorm1d


def test_sync_batchnorm_alone_behaves_like_batchnorm() -> None:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3)
    sbn = SyncBatchNorm(3)
    sbn.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(sbn(x), ref(x))
    torch.testing.assert_close(sbn.running_var, ref.running_var)
