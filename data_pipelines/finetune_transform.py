"""MAE's fine-tuning augmentation, through timm's ``create_transform``.

The official ``util/datasets.py build_transform(is_train=True)`` (which also passes
``color_jitter=None``: timm ignores colour jitter under RandAugment): RandomResizedCrop
(0.08-1, bicubic), horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1`` (2 ops, magnitude 9,
magnitude noise 0.5), ImageNet normalisation and random erasing (p = 0.25, per-pixel noise).
Mixup / CutMix / label smoothing act on the batch in ``vitssl.models.methods.finetune``.

The views leave as float32 (random erasing writes normal noise into normalised pixels, so
they cannot travel as uint8). RandAugment draws its ops with ``np.random``, which the
loader does not seed: each call seeds it from the loader's seeded torch generator and
restores the caller's numpy state, so augmentation is a function of the sample's seed (exact
resume) and the trainer's numpy stream is untouched.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch import Tensor

from vitssl.data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
RANDOM_ERASING = 0.25


class FinetuneTransform:
    """Callable ``PIL.Image -> [view (3, size, size) float32]`` (the loader decodes for it)."""

    takes_bytes = False
    num_views = 1
    view_dtype = torch.float32

    def __init__(self, img_size: int) -> None:
        self.name = "finetune"
        self.size = img_size
        self.timm = create_transform(
            img_size,
            is_training=True,
            auto_augment=RAND_AUGMENT,
            interpolation="bicubic",
            re_prob=RANDOM_ERASING,
            re_mode="pixel",
            re_count=1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )

    @property
    def decode_min_size(self) -> int:
        return self.size

    @property
    def view_sizes(self) -> list[int]:
        return [self.size]

    def __call__(self, img: Image.Image, out: list[Tensor] | None = None) -> list[Tensor]:
        state = np.random.get_state()
        np.random.seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        try:
            view = self.timm(img.convert("RGB"))  # (3, size, size) float32, normalised
        finally:
            np.random.set_state(state)
        if out is not None:
            out[0].copy_(view)
            return [out[0]]
        return [view]
