"""Online k-NN monitoring during pretraining: top-1 on a small held-out labelled subset.

The first ``max_samples`` samples of the labelled shards are split deterministically: every
fifth sample (index % 5 == 0) is a query, the rest the bank. Each call every ``every`` steps
encodes both with the current backbone (eval mode, no grad) and returns
``{"knn/top1": ..., "knn/top5": ...}`` for TensorBoard. It must be called on every rank:
under ZeRO-3 each forward gathers the parameters collectively, so every rank runs the same
number of batches (the reader pads). Without labels it switches itself off with one warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from vitssl.data_pipelines.labelled import NO_LABELS, LabelledReader, has_labels
from vitssl.train.evaluation.features import extract_features
from vitssl.train.evaluation.knn import knn_classify

QUERY_EVERY = 5


class OnlineKNN:
    def __init__(
        self,
        val_shards: str,
        index: str | None,
        img_size: int,
        every: int,
        max_samples: int = 1000,
        *,
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "cls",
        batch_size: int = 64,
    ) -> None:
        if every < 0 or max_samples < 2 * QUERY_EVERY:
            raise ValueError(f"every must be >= 0 and max_samples >= {2 * QUERY_EVERY}")
        self.val_shards, self.index = val_shards, index
        self.img_size, self.every, self.max_samples = img_size, every, max_samples
        self.k, self.temperature, self.pool, self.batch_size = k, temperature, pool, batch_size
        self.enabled = bool(every and val_shards)
        self._checked = False

    def _check_labels(self) -> None:
        self._checked = True
        try:
            labelled = has_labels(self.val_shards, self.index)
        except ValueError as e:
            if NO_LABELS not in str(e):
                raise
            labelled = False
        if not labelled:
            warnings.warn(
                f"online k-NN is off: {self.val_shards} {NO_LABELS}", RuntimeWarning, stacklevel=3
            )
            self.enabled = False

    def __call__(
        self, step: int, backbone: nn.Module, device: torch.device, dtype: torch.dtype
    ) -> dict[str, float] | None:
        if not self.enabled or step % self.every:
            return None
        if not self._checked:
            self._check_labels()
            if not self.enabled:
                return None
        from vitssl.models import distributed

        rank, size = distributed.rank(), distributed.world_size()
        reader = LabelledReader(
            self.val_shards,
            self.img_size,
            index=self.index,
            rank=rank,
            world_size=size,
            batch_size=self.batch_size,
            limit=self.max_samples,
            pad=True,
        )
        feats = extract_features(backbone, reader, device, self.pool, dtype)
        n = feats.labels.shape[0]
        query = torch.arange(n) % QUERY_EVERY == 0
        num_classes = max(feats.num_classes, int(feats.labels.max()) + 1)
        res = knn_classify(
            feats.feats[~query],
            feats.labels[~query],
            feats.feats[query],
            feats.labels[query],
            num_classes,
            k=min(self.k, int((~query).sum())),
            temperature=self.temperature,
            weightings=("distance",),
        )
        return {"knn/top1": res["distance/top1"], "knn/top5": res["distance/top5"]}
