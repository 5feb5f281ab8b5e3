"""Augmentation presets, one per method family, as their papers specify.

A preset is a ``ViewTransform``: ``PIL.Image`` or uint8 ``(3, H, W)`` tensor (as
``decode.decode_pixels`` gives) ``-> list[Tensor]``, each view float32 (3, H, W) normalised with
ImageNet mean/std; ``from_bytes`` takes the encoded image and decodes it at the DCT scale its
drawn crops need. Geometry is RandomResizedCrop (parameters drawn exactly as
torchvision.transforms.v2 draws them, by ``crop_params``), flip, and torchvision's bicubic
antialiased resize (``resized_crop``: the same uint8 kernel, kept channels-last); the image
stays uint8 until one conversion to float; colour ops are the batched ops of ``color_ops``
(tested equal to torchvision's), applied with B = 1, and normalisation is one fused
multiply-add.

| preset | views | crop scale | colour |
| --- | --- | --- | --- |
| mae | 1 | 0.2-1, bicubic | none (MAE) |
| simclr | 2 | 0.08-1 | jitter(0.4, 0.4, 0.4, 0.1) p=0.8, gray 0.2, blur p=0.5 |
| byol | 2 | 0.08-1 | jitter(0.4, 0.4, 0.2, 0.1) p=0.8, gray 0.2; blur 1.0/0.1, solarize 0/0.2 |
| dino | 2 + local | global 0.4-1 (0.14-1 without local crops, as DINO advises) | BYOL's |
| eval | 1 | resize shorter side to size/0.875, centre crop | none |
| finetune | 1 | 0.08-1, bicubic (timm) | RandAugment m9 mstd 0.5, erasing 0.25 |

DINO's local crops take scale 0.05-0.4 at ``local_crop_size`` with blur p=0.5.

``uint8=True`` (what the trainer uses): views stay uint8 (3, H, W) in the channels-last
layout of the decoder and of the resize kernels, colour-augmented views rounded back to 8
bits (as PIL-based pipelines keep them), and ``model_input`` converts and normalises them on
the device. The workers then skip the float conversion and the layout change (a third of
the MAE preset's augmentation time), and shared memory and host-to-device copies carry a
quarter of the bytes, as FFCV and DALI do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor

from vitssl.data_pipelines.color_ops import ColorAugment, ColorParams
from vitssl.data_pipelines.decode import (
    Box,
    covering_reduction,
    decode_pixels,
    decode_region,
    jpeg_size,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("mae", "simclr", "byol", "dino", "eval", "finetune")
BICUBIC = T.InterpolationMode.BICUBIC
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LOG_RATIO = torch.log(torch.tensor(CROP_RATIO)).tolist()  # float32, as torchvision computes it


def blur_kernel_size(img_size: int) -> int:
    """Odd kernel of about 10% of the image side (SimCLR)."""
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


def pil_to_uint8(img: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 (3, H, W), a channels-last view of one copy of the pixels."""
    with warnings.catch_warnings():  # read-only buffer: nothing ever writes into it
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(img.tobytes(), dtype=torch.uint8)
    return flat.view(img.height, img.width, 3).permute(2, 0, 1)


def crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, height, width), drawn with the same calls in the same
    order as torchvision.transforms.v2.RandomResizedCrop (ratio 3/4..4/3), from ``generator``
    (default: the global RNG, which makes it identical to torchvision's draw)."""
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*_LOG_RATIO, generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class _Draw:
    """The random parameters of one view of one image."""

    box: Box
    """(top, left, height, width) of the crop in full-size image pixels."""
    flip: bool
    colour: ColorParams | None


def _bounding_box(boxes: Sequence[Box]) -> Box:
    """The smallest (top, left, height, width) box holding every one of ``boxes``."""
    top = min(b[0] for b in boxes)
    left = min(b[1] for b in boxes)
    bottom = max(b[0] + b[2] for b in boxes)
    right = max(b[1] + b[3] for b in boxes)
    return top, left, bottom - top, right - left


def _scale_box(box: Box, sy: float, sx: float, rows: int, cols: int) -> Box:
    """A crop box of the full-size image on the same image decoded at ``rows x cols``."""
    top, left, h, w = box
    if sy == 1.0 and sx == 1.0:
        return box
    y0, x0 = round(top * sy), round(left * sx)  # nearest: at most half a pixel per edge
    y1, x1 = min(rows, round((top + h) * sy)), min(cols, round((left + w) * sx))
    return y0, x0, max(1, y1 - y0), max(1, x1 - x0)


def resized_crop(pixels: Tensor, top: int, left: int, h: int, w: int, size: int) -> Tensor:
    """torchvision's ``resized_crop`` (bicubic, antialiased; bit-identical, tested) of a uint8
    (3, H, W) image, returned channels-last. The crop is made channels-last-contiguous and
    restrided so that torch allocates a channels-last output (pytorch#68430, torchvision's
    own workaround): its uint8 kernels then neither repack the input nor the output, 0.2 ms
    per 224 px view, and a channels-last batch row takes the result as a plain copy."""
    crop = pixels[:, top : top + h, left : left + w]
    if (h, w) == (size, size):
        return crop
    x = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # (1, 3, h, w)
    x = x.as_strided((1, 3, h, w), (x.numel(), 1, 3 * w, 3))
    out = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )
    return out[0]


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: geometry, then optional colour ops."""

    size: int
    scale: tuple[float, float]
    color: ColorAugment | None
    flip: bool = True


class ViewTransform:
    """Callable ``PIL.Image | uint8 (3, H, W) -> list[Tensor]`` producing a preset's views."""

    takes_bytes = True  # the loader passes encoded images to from_bytes

    def __init__(
        self,
        name: str,
        views: Sequence[ViewSpec],
        eval_size: int | None = None,
        uint8: bool = False,
    ):
        self.name = name
        self.views = list(views)
        self.eval_size = eval_size
        self.uint8 = uint8
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        # [0, 255] -> normalised in one pass: x * scale + offset
        self._scale = 1.0 / (255.0 * self._std)
        self._offset = -self._mean / self._std
        # [0, 1] -> normalised (after the colour ops): x * inv_std + offset
        self._inv_std = 1.0 / self._std

    @property
    def decode_min_size(self) -> int:
        """Shorter side the decoder must keep for any crop (largest output view; see
        decode.py); ``from_bytes`` goes further, to the scale that covers the drawn crops."""
        if self.eval_size is not None:
            return round(self.eval_size / 0.875)
        return max(v.size for v in self.views)

    @property
    def num_views(self) -> int:
        return 1 if self.eval_size is not None else len(self.views)

    @property
    def view_dtype(self) -> torch.dtype:
        """dtype of the views: uint8 (normalised on the device by ``model_input``) or float32."""
        return torch.uint8 if self.uint8 else torch.float32

    @property
    def view_sizes(self) -> list[int]:
        """Side of each view, in order."""
        return [self.eval_size] if self.eval_size is not None else [v.size for v in self.views]

    def __call__(
        self, img: Image.Image | Tensor, out: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        """``out``: optional (3, size, size) tensors of ``view_dtype`` (e.g. rows of a batch)
        to write the views into; the views never share memory with ``img``."""
        pixels = img if isinstance(img, Tensor) else pil_to_uint8(img)  # (3, H, W) uint8
        dest = list(out) if out is not None else [None] * self.num_views
        if self.eval_size is not None:
            resized = F.resize(
                pixels, round(self.eval_size / 0.875), interpolation=BICUBIC, antialias=True
            )
            return [self._normalise(F.center_crop(resized, self.eval_size), dest[0])]
        _, height, width = pixels.shape
        draws = self._draw(height, width)
        return self._render(pixels, draws, [d.box for d in draws], dest)

    def from_bytes(self, data: bytes, out: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The views of an encoded image, decoded at the smallest DCT scale that covers them
        and only over the region they cover.

        The random draws are made first, on the image's full size from its JPEG header, in
        the order ``__call__`` makes them (crop, flip, colour, view by view); the JPEG is then
        decoded at the largest reduction 1, 2, 4 or 8 at which every drawn crop still has
        both sides >= its output size (``decode.covering_reduction``), the crops are mapped
        onto the reduced image, and only the box around them is decoded
        (``decode.decode_region``: the same pixels as that box of a whole-image decode).
        The views therefore equal those of the full-size decode up to resampling, and do not
        depend on how the image was decoded. Raises ``decode.CorruptSample``."""
        size = jpeg_size(data) if self.eval_size is None else None
        if size is None:  # eval (a full-image resize: decode.py's draft rule) or not a JPEG
            return self(decode_pixels(data, self.decode_min_size), out)
        height, width = size
        draws = self._draw(height, width)
        needs = [(d.box[2], d.box[3], spec.size) for d, spec in zip(draws, self.views, strict=True)]
        reduction = covering_reduction(needs)
        rows, cols = -(-height // reduction), -(-width // reduction)  # libjpeg rounds up
        boxes = [_scale_box(d.box, rows / height, cols / width, rows, cols) for d in draws]
        pixels, y0, x0 = decode_region(data, reduction, _bounding_box(boxes))
        boxes = [(top - y0, left - x0, h, w) for top, left, h, w in boxes]
        dest = list(out) if out is not None else [None] * self.num_views
        return self._render(pixels, draws, boxes, dest)

    def _draw(self, height: int, width: int) -> list[_Draw]:
        """Every view's random parameters for an image of ``height x width``, from the
        global RNG in torchvision's order (crop, then flip, then colour)."""
        draws = []
        for spec in self.views:
            box = crop_params(height, width, spec.scale)
            flip = spec.flip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw
            colour = None if spec.color is None else spec.color.sample(1, None, "cpu")
            draws.append(_Draw(box, flip, colour))
        return draws

    def _render(
        self,
        pixels: Tensor,
        draws: list[_Draw],
        boxes: Sequence[Box],
        dest: Sequence[Tensor | None],
    ) -> list[Tensor]:
        """The views drawn, cut from ``pixels`` at ``boxes`` (the drawn crops mapped onto
        ``pixels``, which may be a reduced or partial decode of the image)."""
        views = []
        for spec, draw, (top, left, h, w), target in zip(
            self.views, draws, boxes, dest, strict=True
        ):
            view = resized_crop(pixels, top, left, h, w, spec.size)  # (3, size, size) uint8
            if draw.flip:
                view = view.flip(-1)
            if spec.color is None:
                views.append(self._normalise(view, target))
                continue
            assert draw.colour is not None
            x = torch.empty((1, 3, spec.size, spec.size))  # contiguous: the colour ops' layout
            x.copy_(view.unsqueeze(0)).mul_(1.0 / 255.0)
            x = spec.color.apply(x, draw.colour).squeeze(0)
            if self.uint8:
                views.append(self._to_uint8(x, target))
            elif target is None:
                views.append(x.mul_(self._inv_std).add_(self._offset))
            else:
                views.append(torch.addcmul(self._offset, x, self._inv_std, out=target))
        return views

    def _normalise(self, view: Tensor, out: Tensor | None = None) -> Tensor:
        """uint8 (3, h, w), any layout -> contiguous normalised float32 in one pass; with
        ``uint8`` the view itself (copied into ``out`` when given)."""
        if self.uint8:
            return view if out is None else out.copy_(view)
        out = torch.empty(view.shape) if out is None else out
        return torch.addcmul(self._offset, view, self._scale, out=out)

    @staticmethod
    def _to_uint8(x: Tensor, out: Tensor | None) -> Tensor:
        """float (3, h, w) in [0, 1] -> uint8, rounded to nearest."""
        x = x.mul_(255.0).round_().clamp_(0.0, 255.0)
        return x.to(torch.uint8) if out is None else out.copy_(x)


# the same float32 constants as ViewTransform's fused normalisation: identical results
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(1, 3, 1, 1)
_OFFSET = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)


def model_input(
    views: Tensor,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """A batch of views (B, 3, H, W) as the model takes it, on ``device`` in ``dtype``.

    uint8 views (``uint8=True`` presets) travel as bytes and are normalised there with the
    presets' own float32 constants, so they equal the float views the presets would give;
    float views are only moved and cast."""
    if views.dtype != torch.uint8:
        return views.to(device, dtype=dtype, non_blocking=True, memory_format=memory_format)
    x = views.to(device, non_blocking=True).to(torch.float32)  # (B, 3, H, W)
    x = torch.addcmul(_OFFSET.to(device), x, _SCALE.to(device))
    return x.to(dtype=dtype, memory_format=memory_format)


def build_transform(
    name: str,
    img_size: int,
    *,
    local_crops: int = 0,
    local_crop_size: int = 96,
    uint8: bool = False,
) -> ViewTransform:
    """The preset ``name`` (one of PRESETS) producing views of ``img_size`` pixels
    (``uint8``: 8-bit channels-last views for ``model_input``, see the module docstring)."""
    if img_size < 8:
        raise ValueError(f"img_size must be >= 8, got {img_size}")
    if local_crops < 0:
        raise ValueError(f"local_crops must be >= 0, got {local_crops}")
    if local_crops and name != "dino":
        raise ValueError(f"local crops are only used by the dino preset, not {name!r}")
    kernel = blur_kernel_size(img_size)
    if name == "finetune":  # MAE's fine-tuning: timm's RandAugment + random erasing
        from vitssl.data_pipelines.finetune_transform import FinetuneTransform

        return FinetuneTransform(img_size)  # type: ignore[return-value]
    if name == "mae":
        return ViewTransform(name, [ViewSpec(img_size, (0.2, 1.0), None)], uint8=uint8)
    if name == "simclr":
        color = ColorAugment(0.4, 0.4, 0.4, 0.1, blur_p=0.5, blur_kernel=kernel)
        return ViewTransform(name, [ViewSpec(img_size, (0.08, 1.0), color)] * 2, uint8=uint8)
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
        return ViewTransform(name, views, uint8=uint8)
    if name == "eval":
        return ViewTransform(name, [], eval_size=img_size, uint8=uint8)
    raise ValueError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESETS)}")
