"""Augmentation presets, one per method family, as their papers specify.

A preset is a ``ViewTransform``: ``PIL.Image -> list[Tensor]``, each view float32 (3, H, W)
normalised with ImageNet mean/std. Geometry (RandomResizedCrop, flip, resize) is
torchvision.transforms.v2 on a uint8 tensor (its fast antialiased uint8 kernels); colour ops
are the batched ops of ``gpu_augment`` (tested equal to torchvision's), applied with B = 1.

| preset | views | crop scale | colour |
| --- | --- | --- | --- |
| mae | 1 | 0.2-1, bicubic | none (MAE) |
| simclr | 2 | 0.08-1 | jitter(0.4, 0.4, 0.4, 0.1) p=0.8, gray 0.2, blur p=0.5 |
| byol | 2 | 0.08-1 | jitter(0.4, 0.4, 0.2, 0.1) p=0.8, gray 0.2; blur 1.0/0.1, solarize 0/0.2 |
| dino | 2 + local | global 0.4-1 (0.14-1 without local crops, as DINO advises) | BYOL's |
| eval | 1 | resize shorter side to size/0.875, centre crop | none |

DINO's local crops take scale 0.05-0.4 at ``local_crop_size`` with blur p=0.5.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import Tensor

from data_pipelines.gpu_augment import ColorAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("mae", "simclr", "byol", "dino", "eval")
BICUBIC = T.InterpolationMode.BICUBIC


def blur_kernel_size(img_size: int) -> int:
    """Odd kernel of about 10% of the image side (SimCLR)."""
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


def pil_to_uint8(img: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 (3, H, W), a channels-last view of one copy of the pixels."""
    with warnings.catch_warnings():  # read-only buffer: nothing ever writes into it
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(img.tobytes(), dtype=torch.uint8)
    return flat.view(img.height, img.width, 3).permute(2, 0, 1)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: geometry, then optional colour ops."""

    size: int
    scale: tuple[float, float]
    color: ColorAugment | None
    flip: bool = True


class ViewTransform:
    """Callable ``PIL.Image -> list[Tensor]`` producing the views of one preset."""

    def __init__(self, name: str, views: Sequence[ViewSpec], eval_size: int | None = None):
        self.name = name
        self.views = list(views)
        self.eval_size = eval_size
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        # uint8 -> normalised in one pass: x * scale + offset
        self._scale = 1.0 / (255.0 * self._std)
        self._offset = -self._mean / self._std
        self._geometry = [
            T.Compose(
                [T.RandomResizedCrop(v.size, scale=v.scale, interpolation=BICUBIC, antialias=True)]
                + ([T.RandomHorizontalFlip()] if v.flip else [])
            )
            for v in self.views
        ]
        if eval_size is not None:
            resize = round(eval_size / 0.875)
            self._geometry = [
                T.Compose(
                    [
                        T.Resize(resize, interpolation=BICUBIC, antialias=True),
                        T.CenterCrop(eval_size),
                    ]
                )
            ]

    @property
    def decode_min_size(self) -> int:
        """Shorter side the decoder must keep (largest output view; see decode.py)."""
        if self.eval_size is not None:
            return round(self.eval_size / 0.875)
        return max(v.size for v in self.views)

    @property
    def num_views(self) -> int:
        return len(self._geometry)

    def __call__(self, img: Image.Image) -> list[Tensor]:
        pixels = pil_to_uint8(img)  # (3, H, W) uint8
        if self.eval_size is not None:
            return [self._geometry[0](pixels).float().mul_(self._scale).add_(self._offset)]
        out = []
        for spec, geometry in zip(self.views, self._geometry, strict=False):
            view = geometry(pixels)  # (3, size, size) uint8
            if spec.color is None:
                out.append(view.float().mul_(self._scale).add_(self._offset))
                continue
            x = spec.color(view.float().div_(255.0).unsqueeze(0)).squeeze(0)  # via (1, 3, s, s)
            out.append(x.sub_(self._mean).div_(self._std))
        return out


def build_transform(
    name: str, img_size: int, *, local_crops: int = 0, local_crop_size: int = 96
) -> ViewTransform:
    """The preset ``name`` (one of PRESETS) producing views of ``img_size`` pixels."""
    if img_size < 8:
        raise ValueError(f"img_size must be >= 8, got {img_size}")
    if local_crops < 0:
        raise ValueError(f"local_crops must be >= 0, got {local_crops}")
    if local_crops and name != "dino":
        raise ValueError(f"local crops are only used by the dino preset, not {name!r}")
    kernel = blur_kernel_size(img_size)
    if name == "mae":
        return ViewTransform(name, [ViewSpec(img_size, (0.2, 1.0), None)])
    if name == "simclr":
        color = ColorAugment(0.4, 0.4, 0.4, 0.1, blur_p=0.5, blur_kernel=kernel)
        return ViewTransform(name, [ViewSpec(img_size, (0.08, 1.0), color)] * 2)
    if name in ("byol", "dino"):
        first = ColorAugment(0.4, 0.4, 0.2, 0.1, blur_p=1.0, blur_kernel=kernel, solarize_p=0.0)
        second = ColorAugment(0.4, 0.4, 0.2, 0.1, blur_p=0.1, blur_kernel=kernel, solarize_p=0.2)
        scale = (0.08, 1.0) if name == "byol" else (0.4, 1.0) if local_crops else (0.14, 1.0)
        views = [ViewSpec(img_size, scale, first), ViewSpec(img_size, scale, second)]
        if local_crops:
            local_color = ColorAugment(
                0.4, 0.4, 0.2, 0.1, blur_p=0.5, blur_kernel=blur_kernel_size(local_crop_size)
            )
            views += [ViewSpec(local_crop_size, (0.05, 0.4), local_color)] * local_crops
        return ViewTransform(name, views)
    if name == "eval":
        return ViewTransform(name, [], eval_size=img_size)
    raise ValueError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESETS)}")
