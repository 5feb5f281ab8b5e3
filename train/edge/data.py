"""Images as numpy arrays through the eval preprocessing, for calibration and verification."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageSet:
    """``images (N, 3, S, S)`` float32 normalised (eval preset), ``labels (N,)`` int64."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] | None

    def __len__(self) -> int:
        return len(self.images)


def load_images(
    spec: str, img_size: int, limit: int | None = None, index: str | None = None
) -> ImageSet:
    """The first ``limit`` samples of labelled shards or an ImageFolder, in source order.

    Shards are written shuffled (make_shards), so the first samples are a fair draw.
    """
    from data_pipelines.labelled import LabelledReader

    reader = LabelledReader(spec, img_size, index=index or None, batch_size=128, limit=limit)
    imgs, labels = [], []
    for batch in reader:
        imgs.append(batch["image"].numpy())
        labels.append(batch["label"].numpy())
    return ImageSet(np.concatenate(imgs), np.concatenate(labels), reader.classes)
