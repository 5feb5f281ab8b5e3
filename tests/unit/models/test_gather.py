"""Two gloo processes give the losses, gradients and batch-norm outputs of one process that
runs the concatenated batch (gather with gradient, global batch norm, centre all-reduce,
Sinkhorn-Knopp targets)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vitssl.models.distributed import all_reduce_mean_, gather_with_grad
from vitssl.models.heads import SyncBatchNorm, maybe_sync_batchnorm
from vitssl.models.losses import info_nce_loss, nt_xent_loss, sinkhorn_knopp

WORLD, B, D_IN, D = 2, 3, 5, 4


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x1": torch.randn(WORLD * B, D_IN, generator=g),
        "x2": torch.randn(WORLD * B, D_IN, generator=g),
        "w": torch.randn(D, D_IN, generator=g),
        "bn_x": torch.randn(WORLD * B, D, 2, generator=g),
        "bn_out_w": torch.randn(WORLD * B, D, 2, generator=g),
        "sk_logits": torch.randn(WORLD * B, 7, generator=g),
    }


def _losses(x1: torch.Tensor, x2: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """NT-Xent and InfoNCE of a linear projector; returns losses and gradients."""
    out = {}
    for name in ("nt_xent", "info_nce"):
        weight = w.clone().requires_grad_(True)
        a = x1.clone().requires_grad_(True)
        z1, z2 = a @ weight.T, x2 @ weight.T
        if name == "nt_xent":
            loss = nt_xent_loss(z1, z2, 0.5)
        else:
            loss = info_nce_loss(z1, z2, 0.5) + info_nce_loss(z2, z1, 0.5)
        loss.backward()
        assert weight.grad is not None and a.grad is not None
        out[name] = loss.detach()
        out[f"{name}_wgrad"] = weight.grad
        out[f"{name}_xgrad"] = a.grad
    return out


def _bn(x: torch.Tensor, out_w: torch.Tensor, bn: nn.Module) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * out_w).sum().backward()
    assert x.grad is not None
    return {
        "bn_y": y.detach(),
        "bn_xgrad": x.grad,
        "bn_wgrad": bn.weight.grad,
        "bn_running_var": bn.running_var.clone(),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    data = _data()
    rows = slice(rank * B, (rank + 1) * B)
    result = _losses(data["x1"][rows], data["x2"][rows], data["w"])
    bn = maybe_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(D)))[0]
    assert isinstance(bn, SyncBatchNorm)
    result.update(_bn(data["bn_x"][rows], data["bn_out_w"][rows], bn))
    result["gathered"] = gather_with_grad(torch.full((2,), float(rank)))
    result["mean"] = all_reduce_mean_(torch.tensor([float(rank)]))
    result["sk"] = sinkhorn_knopp(data["sk_logits"][rows], 0.5, iterations=3)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    data = _data()
    ref = _losses(data["x1"], data["x2"], data["w"])
    ref.update(_bn(data["bn_x"], data["bn_out_w"], nn.BatchNorm1d(D)))

    for name in ("nt_xent", "info_nce"):
        # The mean over ranks is the global loss; data parallelism averages the gradients.
        torch.testing.assert_close(sum(r[name] for r in ranks) / WORLD, ref[name])
        wgrad = sum(r[f"{name}_wgrad"] for r in ranks) / WORLD
        torch.testing.assert_close(wgrad, ref[f"{name}_wgrad"])
        xgrad = torch.cat([r[f"{name}_xgrad"] for r in ranks]) / WORLD
        torch.testing.assert_close(xgrad, ref[f"{name}_xgrad"])

    # Each rank's targets are its rows of the global batch's balanced assignment.
    sk_ref = sinkhorn_knopp(data["sk_logits"], 0.5, iterations=3)
    torch.testing.assert_close(torch.cat([r["sk"] for r in ranks]), sk_ref)
    torch.testing.assert_close(torch.cat([r["bn_y"] for r in ranks]), ref["bn_y"])
    torch.testing.assert_close(torch.cat([r["bn_xgrad"] for r in ranks]), ref["bn_xgrad"])
    torch.testing.assert_close(sum(r["bn_wgrad"] for r in ranks), ref["bn_wgrad"])
    for r in ranks:
        torch.testing.assert_close(r["bn_running_var"], ref["bn_running_var"])
        torch.testing.assert_close(r["gathered"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        torch.testing.assert_close(r["mean"], torch.tensor([0.5]))
