"""Batched colour augmentations on float tensors (B, 3, H, W) in [0, 1], on any device.

Each op matches its torchvision.transforms.v2 counterpart for the same parameters; the
parameters are per sample (tensors of shape (B,)). ``ColorAugment`` draws them from a
``torch.Generator`` (the optional GPU path) or from the global RNG (the CPU presets, B = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def grayscale(x: Tensor) -> Tensor:
    """Luma as in torchvision: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    r = _per_sample(ratio)
    return (r * x + (1.0 - r) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]); V and S are kept."""
    r, g, b = x.unbind(dim=1)  # each (B, H, W)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(
        maxc == r,
        ((g - b) / safe) % 6.0,
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue6 = (hue6 + _per_sample(shift).squeeze(1) * 6.0) % 6.0
    channels = []
    for offset in (5.0, 3.0, 1.0):  # R, G, B of the HSV -> RGB formula
        k = (hue6 + offset) % 6.0
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        channels.append(maxc - chroma * ramp)
    return torch.stack(channels, dim=1)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels (B, kernel_size), as torchvision builds them."""
    half = (kernel_size - 1) / 2.0
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    w = torch.exp(-(t.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1) ** 2))
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with reflect padding and a per-sample sigma.

    Taps further than 4 sigma from the centre (weight < 3.4e-4 of the peak) are dropped and the
    kernel renormalised: the result then differs from the full kernel by < 1e-3, and the blur
    costs O(sigma) instead of O(kernel_size).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    radius = min(kernel_size // 2, max(1, math.ceil(4.0 * float(sigma.max()))))
    size = 2 * radius + 1
    if radius >= x.shape[-1] or radius >= x.shape[-2]:
        raise ValueError(f"blur radius {radius} too large for image {tuple(x.shape[-2:])}")
    w = gaussian_kernels(sigma.to(x.dtype), size)  # (B, size)
    for dim in (3, 2):  # along W, then along H
        length = x.shape[dim]
        xp = x.index_select(dim, _reflect_index(length, radius, x.device))  # padded along dim
        out = xp.narrow(dim, 0, length) * _per_sample(w[:, 0])
        for i in range(1, size):
            out.addcmul_(xp.narrow(dim, i, length), _per_sample(w[:, i]))
        x = out
    return x


def _reflect_index(length: int, radius: int, device: torch.device) -> Tensor:
    """Indices of reflect padding (as F.pad 'reflect'): [r..1, 0..L-1, L-2..L-1-r]."""
    i = torch.arange(-radius, length + radius, device=device).abs()
    return torch.where(i >= length, 2 * (length - 1) - i, i)


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


@dataclass(frozen=True)
class ColorAugment:
    """Random colour jitter, grayscale, blur and solarize with per-sample parameters.

    Order as in the papers' pipelines: jitter (its four ops in a random order per sample, like
    torchvision's ColorJitter), grayscale, blur, solarize.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 23
    solarize_p: float = 0.0

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: (B, 3, H, W) float in [0, 1] -> same shape, new tensor."""
        batch = x.shape[0]

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=x.device)

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * rand(batch)

        jitter = rand(batch) < self.jitter_p
        factors = [
            uniform(max(0.0, 1 - self.brightness), 1 + self.brightness),
            uniform(max(0.0, 1 - self.contrast), 1 + self.contrast),
            uniform(max(0.0, 1 - self.saturation), 1 + self.saturation),
            uniform(-self.hue, self.hue),
        ]
        order = rand(batch, 4).argsort(dim=1)  # (B, 4) per-sample op order
        gray = rand(batch) < self.gray_p
        blur = rand(batch) < self.blur_p
        sigma = uniform(*self.blur_sigma)
        solar = rand(batch) < self.solarize_p

        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        x = x.clone()
        for stage in range(4):
            for op_id, op in enumerate(ops):
                _apply(x, jitter & (order[:, stage] == op_id), op, factors[op_id])
        _apply(x, gray, lambda v: grayscale(v).expand(-1, 3, -1, -1))
        _apply(x, blur, lambda v, s: gaussian_blur(v, s, self.blur_kernel), sigma)
        _apply(x, solar, solarize)
        return x


def _apply(x: Tensor, mask: Tensor, op, param: Tensor | None = None) -> None:
    """In place: x[mask] = op(x[mask], param[mask])."""
    if x.shape[0] == 1:  # the per-sample CPU path: avoid indexing
        if bool(mask[0]):
            x.copy_(op(x) if param is None else op(x, param))
        return
    sel = mask.nonzero().squeeze(1)
    if sel.numel() == 0:
        return
    sub = x.index_select(0, sel)
    x.index_copy_(0, sel, op(sub) if param is None else op(sub, param.index_select(0, sel)))
