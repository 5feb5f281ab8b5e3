"""Batched colour augmentations on float tensors (B, 3, H, W) in [0, 1], on any device.

Each op matches its torchvision.transforms.v2 counterpart for the same parameters; the
parameters are per sample (tensors of shape (B,), or Python floats for B = 1).
``ColorAugment`` draws them from a ``torch.Generator`` (the optional device path, see
device_augment.py) or from the global RNG (the CPU presets, B = 1).
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


Factor = Tensor | float


def _per_sample(v: Factor) -> Tensor | float:
    """A per-sample factor (B,) as (B, 1, 1, 1) for broadcasting; a Python float as is."""
    return v.view(-1, 1, 1, 1) if isinstance(v, Tensor) else v


def _blend(x: Tensor, other: Tensor, ratio: Factor) -> Tensor:
    r = _per_sample(ratio)
    return (x * r).add_(other * (1.0 - r)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Factor) -> Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Factor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Factor) -> Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Factor) -> Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]); V and S are kept.

    Written with multiplications by masks instead of ``torch.where`` and ``%`` (both several
    times slower per element on CPU): hue in sextants, h6 = (g - b) / c on the red sextant,
    (b - r) / c + 2 on the green one, (r - g) / c + 4 on the blue one (c: chroma).
    """
    r, g, b = x.unbind(dim=1)  # each (B, H, W)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    inv = (chroma + (chroma == 0)).reciprocal_()  # gray pixels: any hue, chroma 0 keeps them
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    hue6 = ((g - b) * is_r).add_((b - r) * is_g).add_((r - g) * is_b).mul_(inv)
    hue6.add_(is_g * 2.0).add_(is_b * 4.0)  # in [-1, 5]
    shift6 = _per_sample(shift)
    hue6.add_(shift6.squeeze(1) * 6.0 if isinstance(shift6, Tensor) else shift6 * 6.0)
    out = torch.empty_like(x)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):  # R, G, B of the HSV -> RGB formula
        k = hue6 + offset
        k.sub_(torch.floor(k * (1.0 / 6.0)).mul_(6.0))  # k mod 6
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.addcmul(maxc, chroma, ramp, value=-1.0, out=out[:, channel])
    return out


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
        out = xp.narrow(dim, 0, length) * w[:, 0].view(-1, 1, 1, 1)
        for i in range(1, size):
            out.addcmul_(xp.narrow(dim, i, length), w[:, i].view(-1, 1, 1, 1))
        x = out
    return x


def _reflect_index(length: int, radius: int, device: torch.device) -> Tensor:
    """Indices of reflect padding (as F.pad 'reflect'): [r..1, 0..L-1, L-2..L-1-r]."""
    i = torch.arange(-radius, length + radius, device=device).abs()
    return torch.where(i >= length, 2 * (length - 1) - i, i)


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    if threshold == 0.5:  # x >= 0.5 exactly where 1 - x <= x; cheaper than torch.where
        return torch.minimum(x, 1.0 - x)
    return torch.where(x >= threshold, 1.0 - x, x)


@dataclass(frozen=True)
class ColorAugment:
    """Random colour jitter, grayscale, blur and solarize with per-sample parameters.

    Order as in the papers' pipelines: jitter (its four ops in a random order per sample, like
    torchvision's ColorJitter), grayscale, blur, solarize. The parameters of a batch come from
    one draw of the generator (``sample``); ``apply`` takes them from the caller (the device
    path draws them per sample on CPU from per-sample seeds, then applies them batched).
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

    def sample(self, batch: int, generator: torch.Generator | None, device) -> ColorParams:
        """Per-sample parameters from one draw of (B, 13) uniforms (one RNG call)."""
        u = torch.rand(batch, 13, generator=generator, device=device)

        def between(col: int, low: float, high: float) -> Tensor:
            return low + (high - low) * u[:, col]

        return ColorParams(
            jitter=u[:, 0] < self.jitter_p,
            factors=(
                between(1, max(0.0, 1 - self.brightness), 1 + self.brightness),
                between(2, max(0.0, 1 - self.contrast), 1 + self.contrast),
                between(3, max(0.0, 1 - self.saturation), 1 + self.saturation),
                between(4, -self.hue, self.hue),
            ),
            order=u[:, 5:9].argsort(dim=1),  # (B, 4) per-sample op order
            gray=u[:, 9] < self.gray_p,
            blur=u[:, 10] < self.blur_p,
            sigma=between(11, *self.blur_sigma),
            solarize=u[:, 12] < self.solarize_p,
        )

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: (B, 3, H, W) float in [0, 1] -> same shape, new tensor (x is not modified)."""
        return self.apply(x, self.sample(x.shape[0], generator, x.device))

    def apply(self, x: Tensor, params: ColorParams) -> Tensor:
        """x: (B, 3, H, W) float in [0, 1] with the parameters of B samples -> new tensor."""
        if x.shape[0] == 1:
            return self._one(x, params)
        params = params.to(x.device)
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        x = x.clone()
        for stage in range(4):
            for op_id, op in enumerate(ops):
                _apply(
                    x, params.jitter & (params.order[:, stage] == op_id), op, params.factors[op_id]
                )
        _apply(x, params.gray, lambda v: grayscale(v).expand(-1, 3, -1, -1))
        _apply(x, params.blur, lambda v, s: gaussian_blur(v, s, self.blur_kernel), params.sigma)
        _apply(x, params.solarize, solarize)
        return x

    def _one(self, x: Tensor, p: ColorParams) -> Tensor:
        """B = 1 (the CPU presets): Python branches and scalar factors, no masked indexing."""
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        jitter, gray, blur, solar = (bool(v) for v in (p.jitter, p.gray, p.blur, p.solarize))
        out = x
        if jitter:
            factors = [float(f) for f in p.factors]
            for op_id in p.order[0].tolist():
                out = ops[op_id](out, factors[op_id])
        if gray:
            out = grayscale(out).expand(-1, 3, -1, -1).contiguous()
        if blur:
            out = gaussian_blur(out, p.sigma.to(x.device), self.blur_kernel)
        if solar:
            out = solarize(out)
        return out.clone() if out is x else out


@dataclass(frozen=True)
class ColorParams:
    """Per-sample parameters of ``ColorAugment``, each with leading dimension B."""

    jitter: Tensor  # (B,) bool: apply the colour jitter
    factors: tuple[Tensor, Tensor, Tensor, Tensor]  # brightness, contrast, saturation, hue
    order: Tensor  # (B, 4): the jitter ops' order (0..3 as in ``factors``)
    gray: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) blur sigma
    solarize: Tensor  # (B,) bool

    @staticmethod
    def cat(parts: list[ColorParams]) -> ColorParams:
        def cat(get) -> Tensor:
            return torch.cat([get(p) for p in parts])

        return ColorParams(
            jitter=cat(lambda p: p.jitter),
            factors=tuple(cat(lambda p, i=i: p.factors[i]) for i in range(4)),  # type: ignore[arg-type]
            order=cat(lambda p: p.order),
            gray=cat(lambda p: p.gray),
            blur=cat(lambda p: p.blur),
            sigma=cat(lambda p: p.sigma),
            solarize=cat(lambda p: p.solarize),
        )

    def to(self, device: torch.device | str) -> ColorParams:
        return ColorParams(
            self.jitter.to(device),
            tuple(f.to(device) for f in self.factors),  # type: ignore[arg-type]
            self.order.to(device),
            self.gray.to(device),
            self.blur.to(device),
            self.sigma.to(device),
            self.solarize.to(device),
        )


def _apply(x: Tensor, mask: Tensor, op, param: Tensor | None = None) -> None:
    """In place: x[mask] = op(x[mask], param[mask])."""
    sel = mask.nonzero().squeeze(1)
    if sel.numel() == 0:
        return
    sub = x.index_select(0, sel)
    x.index_copy_(0, sel, op(sub) if param is None else op(sub, param.index_select(0, sel)))
