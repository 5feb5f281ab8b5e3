"""Images as numpy arrays through the deployment preprocessing, for calibration and
verification: the very ``decode`` / ``preprocess`` of the artefact's ``infer.py`` applied to
:func:`vitssl.train.edge.preprocessing.deployment_spec` (one preprocessing for both)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitssl.train.edge.infer import ImageError, decode, preprocess
from vitssl.train.edge.preprocessing import deployment_spec


@dataclass
class ImageSet:
    """``images (N, 3, S, S)`` float32 normalised (deployment spec), ``labels (N,)`` int64."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] | None

    def __len__(self) -> int:
        return len(self.images)


def _encoded(spec: str, limit: int | None, index: str | None) -> Iterator[tuple[bytes, int, str]]:
    """(image bytes, label, where) of the first ``limit`` samples, in source order."""
    from vitssl.data_pipelines.labelled import NO_LABELS, open_source
    from vitssl.data_pipelines.tar_samples import read_samples

    source = open_source(spec, index)
    total = source.num_samples if limit is None else min(limit, source.num_samples)
    if source.files:
        for path, label in source.files[:total]:
            yield Path(path).read_bytes(), label, path
        return
    left = total
    for shard, count in zip(source.shards, source.counts, strict=True):
        if left <= 0:
            return
        for i, raw in read_samples(shard, 0, min(count, left), lambda _: True, with_labels=True):
            assert raw is not None
            where = f"{shard} sample {i} ({raw.key or '?'})"
            if raw.error == "no cls member":
                raise ValueError(f"{spec}: {NO_LABELS} ({where} has no cls)")
            if raw.error is not None or raw.image is None or raw.label is None:
                raise ValueError(f"unreadable sample {where}: {raw.error}")
            yield raw.image, raw.label, where
        left -= count


def load_images(
    spec: str, img_size: int, limit: int | None = None, index: str | None = None
) -> ImageSet:
    """The first ``limit`` samples of labelled shards or an ImageFolder, in source order.

    Shards are written shuffled (make_shards), so the first samples are a fair draw. An
    unreadable sample stops the load (the evaluation never silently changes its data set).
    """
    from vitssl.data_pipelines.labelled import open_source

    pre = deployment_spec(img_size)
    imgs, labels = [], []
    for data, label, where in _encoded(spec, limit, index):
        try:
            imgs.append(preprocess(decode(data, pre), pre))
        except ImageError as e:
            raise ValueError(f"unreadable sample {where}: {e}") from None
        labels.append(label)
    if not imgs:
        raise ValueError(f"{spec}: no samples")
    classes = open_source(spec, index).classes
    return ImageSet(np.stack(imgs), np.asarray(labels, np.int64), classes)
