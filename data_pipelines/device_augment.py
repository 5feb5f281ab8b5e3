"""Decode and augment on the device: batches of encoded JPEGs -> views, for every preset.

With ``build_loader(..., decode_on_device=True)`` the CPU workers only read and batch bytes;
``DeviceViews`` then decodes the batch with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA,
libjpeg on CPU) and crops, resizes, flips, colour-augments and normalises on the device.

Per sample, the random draws come from a CPU ``torch.Generator`` seeded with the sample's
seed, in the order of the CPU path (per view: crop, flip, colour; see transforms.py), so the
views are deterministic and resumable, and for the same decoded image the crops, flips and
colour parameters are those of the CPU path. Differences left: the full-size decode (no DCT
scaling; decoders may differ by a few levels) and, on CUDA, the float resize kernel rounded
back to uint8 where the CPU path uses the native uint8 kernel.

    views = DeviceViews.from_transform(build_transform("simclr", 224), "cuda")(batch)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from vitssl.data_pipelines.color_ops import ColorParams
from vitssl.data_pipelines.decode import CorruptSample, decode_pixels
from vitssl.data_pipelines.transforms import (
    BICUBIC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewSpec,
    ViewTransform,
    build_transform,
    crop_params,
)

__all__ = ["DeviceViews", "decode_batch"]


def decode_batch(encoded: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """uint8 (3, H, W) images on ``device`` from 1-D encoded JPEGs (batched decode) or
    already decoded (3, H, W) pixels. A JPEG the batched decoder rejects is decoded alone on
    the CPU; if that fails too, ``CorruptSample`` names its place in the batch."""
    device = torch.device(device)
    jpeg_at = [i for i, t in enumerate(encoded) if t.dim() == 1]
    out: list[Tensor | None] = [
        None if t.dim() == 1 else t.to(device, non_blocking=True) for t in encoded
    ]
    jpegs = [encoded[i] for i in jpeg_at]
    try:
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:
        decoded = [_decode_one(encoded[i], i, device) for i in jpeg_at]
    for i, img in zip(jpeg_at, decoded, strict=True):
        out[i] = img
    return [t for t in out if t is not None]


def _decode_one(data: Tensor, position: int, device: torch.device) -> Tensor:
    try:
        return decode_pixels(data.numpy().tobytes()).to(device)
    except CorruptSample as exc:
        raise CorruptSample(f"batch item {position}: {exc}") from exc


class DeviceViews:
    """Callable ``batch -> views``: list of (B, 3, size, size) float32 tensors on ``device``.

    ``preset``, ``img_size``, ``local_crops`` and ``local_crop_size`` are those of
    ``transforms.build_transform``; ``from_transform`` takes an already built preset.
    """

    def __init__(
        self,
        preset: str,
        img_size: int,
        *,
        local_crops: int = 0,
        local_crop_size: int = 96,
        device: torch.device | str = "cuda",
    ):
        transform = build_transform(
            preset, img_size, local_crops=local_crops, local_crop_size=local_crop_size
        )
        self._init(transform, device)

    @classmethod
    def from_transform(cls, transform: ViewTransform, device: torch.device | str) -> DeviceViews:
        self = cls.__new__(cls)
        self._init(transform, device)
        return self

    def _init(self, transform: ViewTransform, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available")
        self.views: list[ViewSpec] = list(transform.views)
        self.eval_size = transform.eval_size
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._inv_std = 1.0 / std
        self._offset = -torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) / std

    @property
    def num_views(self) -> int:
        return 1 if self.eval_size is not None else len(self.views)

    def __call__(self, batch: dict) -> list[Tensor]:
        images = decode_batch(batch["jpeg"], self.device)
        if self.eval_size is not None:
            resize = round(self.eval_size / 0.875)
            crops = [
                F.center_crop(
                    F.resize(img, resize, interpolation=BICUBIC, antialias=True),
                    [self.eval_size] * 2,
                )
                for img in images
            ]
            return [self._normalise(torch.stack(crops))]
        seeds = batch["seed"].tolist()
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return [self._view(spec, images, generators) for spec in self.views]

    def _view(
        self, spec: ViewSpec, images: list[Tensor], generators: list[torch.Generator]
    ) -> Tensor:
        """One view of every sample, drawing from each sample's generator in CPU-path order."""
        crops, flips, colour = [], [], []
        for img, g in zip(images, generators, strict=True):
            top, left, h, w = crop_params(img.shape[-2], img.shape[-1], spec.scale, g)
            crops.append(
                F.resized_crop(img, top, left, h, w, [spec.size] * 2, BICUBIC, antialias=True)
            )
            flips.append(spec.flip and bool(torch.rand(1, generator=g) < 0.5))
            if spec.color is not None:
                colour.append(spec.color.sample(1, g, "cpu"))
        x = torch.stack(crops)  # (B, 3, size, size) uint8
        flip = torch.tensor(flips, device=self.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if spec.color is None:
            return self._normalise(x)
        out = spec.color.apply(x.float().div_(255.0), ColorParams.cat(colour))
        return out.mul_(self._inv_std).add_(self._offset)

    def _normalise(self, x: Tensor) -> Tensor:
        """uint8 (B, 3, h, w) -> normalised float32, one fused multiply-add."""
        return torch.addcmul(self._offset, x, self._inv_std / 255.0)
