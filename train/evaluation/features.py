"""Feature extraction over all labelled samples, split across ranks and gathered in order.

Every rank runs the frozen model on its contiguous share of the samples
(:class:`data_pipelines.labelled.LabelledReader`), then the pieces are all-gathered and put
back in sample order, so every rank holds the same ``(N, D)`` bank whatever the number of
ranks. Features are stored in fp16 (a 1.28M x 768 bank is 2 GB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vitssl.data_pipelines.labelled import LabelledReader
from vitssl.models.backbones import embed
from vitssl.models.distributed import world_size

POOLS = ("cls", "avg")


@dataclass
class Features:
    """Outputs of one pass, in sample order: ``feats (N, D)``, ``labels (N,)``."""

    feats: torch.Tensor
    labels: torch.Tensor
    classes: list[str] | None

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1


def gather_ordered(local: torch.Tensor, index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """All ranks' rows ``local (n_r, ...)`` at global ``index (n_r,)`` -> ``(num_samples, ...)``.

    Every rank gets the full tensor. Rows are padded to the largest rank for ``all_gather``.
    """
    out = torch.zeros((num_samples, *local.shape[1:]), dtype=local.dtype)
    size = world_size()
    if size == 1:
        out[index] = local.cpu()
        return out
    backend_device = local.device
    counts = torch.tensor([local.shape[0]], device=backend_device)
    all_counts = [torch.zeros_like(counts) for _ in range(size)]
    dist.all_gather(all_counts, counts)
    largest = int(max(c.item() for c in all_counts))
    pad = largest - local.shape[0]
    padded = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))])
    padded_index = torch.cat(
        [index.to(backend_device), index.new_full((pad,), -1).to(backend_device)]
    )
    rows = [torch.empty_like(padded) for _ in range(size)]
    ids = [torch.empty_like(padded_index) for _ in range(size)]
    dist.all_gather(rows, padded)
    dist.all_gather(ids, padded_index)
    for r, i in zip(rows, ids, strict=True):
        keep = i >= 0
        out[i[keep].cpu()] = r[keep].cpu()
    return out


@torch.no_grad()
def run_model(
    fn: Callable[[torch.Tensor], torch.Tensor],
    reader: LabelledReader,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype = torch.float16,
) -> Features:
    """``fn(images) -> (B, D)`` over every sample of ``reader``; gathered to all ranks."""
    outs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    for batch in reader:
        imgs = batch["image"].to(device, non_blocking=True)
        with autocast:
            y = fn(imgs)  # (B, D)
        keep = batch["index"] >= 0  # padding batches (equal batch counts per rank)
        outs.append(y.float()[keep.to(y.device)].to(out_dtype).cpu())
        labels.append(batch["label"][keep])
        index.append(batch["index"][keep])
    dim = _output_dim(outs)
    local = torch.cat(outs) if outs else torch.zeros(0, dim, dtype=out_dtype)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    local_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    comm = device if _backend_needs_device() else torch.device("cpu")
    n = reader.num_samples
    feats = gather_ordered(local.to(comm), local_index.to(comm), n)
    all_labels = gather_ordered(local_labels.to(comm), local_index.to(comm), n)
    return Features(feats, all_labels, reader.classes)


def _output_dim(outs: list[torch.Tensor]) -> int:
    """Feature width, agreed by all ranks (a rank may have had no samples)."""
    dim = torch.tensor([outs[0].shape[1] if outs else 0])
    if world_size() > 1:
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    return int(dim)


def _backend_needs_device() -> bool:
    return world_size() > 1 and dist.get_backend() == "nccl"


def extract_features(
    backbone: nn.Module,
    reader: LabelledReader,
    device: torch.device,
    pool: str = "cls",
    dtype: torch.dtype = torch.float32,
) -> Features:
    """Pooled backbone embeddings (``models.backbones.embed``): ViT class token or patch mean,
    CNN global average."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    was_training = backbone.training
    backbone.eval()
    try:
        return run_model(lambda x: embed(backbone, x, pool), reader, device, dtype)
    finally:
        backbone.train(was_training)
