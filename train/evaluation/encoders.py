"""Any weights -> a frozen backbone for evaluation: what ``vitssl.train.weights`` resolves, or a
random init.

An encoder spec is whatever :func:`vitssl.train.weights.resolve_weights` accepts (run directory,
checkpoint, exported ``encoder.safetensors``, ...) or ``random:<timm_name>``: a randomly
initialised backbone of that name (``img_size`` and ``patch_size`` from the caller).
``pixels`` is no network: the normalised image flattened to ``3 * img_size**2`` numbers (the
raw-pixel baseline: a learnt feature is only useful where it beats this).

``random_init=True`` builds the architecture of any spec with fresh weights (the baseline
that every pretrained number is compared with); its weights depend only on ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitssl.models.backbones import create_backbone
from vitssl.train.config import ModelSection
from vitssl.train.weights import check_arch, model_config, resolve_weights

RANDOM_PREFIX = "random:"
PIXELS = "pixels"


class PixelEncoder(nn.Module):
    """The identity feature: ``(B, 3, H, W)`` normalised images -> ``(B, 3*H*W)``.

    Written by hand because it is the baseline itself: no timm model flattens its input.
    ``num_features`` lets linear heads size themselves as for any backbone.
    """

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.num_features = 3 * img_size * img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float()


@dataclass
class Encoder:
    """A backbone in eval mode and where it came from (written into every result)."""

    model: nn.Module
    arch: ModelSection
    source: str
    """The resolved checkpoint or weights file, or ``random:<name>``."""
    kind: str
    """checkpoint, export, state_dict, random or pixels."""
    info: dict[str, Any] = field(default_factory=dict)
    """Step, method and other metadata of the checkpoint."""

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "model": self.arch.name, **self.info}


def load_encoder(
    spec: str,
    *,
    random_init: bool = False,
    img_size: int = 32,
    patch_size: int = 4,
    seed: int = 0,
    expect: ModelSection | None = None,
) -> Encoder:
    """Build the backbone of ``spec`` in eval mode, with its weights or (``random_init``) fresh.

    ``expect``, when given, is the architecture the caller needs (name, img_size, patch_size):
    a checkpoint of another architecture is refused.
    """
    if spec == PIXELS:
        arch = model_config({"name": PIXELS, "img_size": img_size, "patch_size": 1})
        pixels = PixelEncoder(img_size).eval()
        return Encoder(pixels, arch, PIXELS, PIXELS, {"img_size": img_size})
    if spec.startswith(RANDOM_PREFIX):
        raw = {"name": spec[len(RANDOM_PREFIX) :], "img_size": img_size, "patch_size": patch_size}
        weights, arch = None, model_config(raw)
        if expect is not None:
            check_arch(arch, expect, spec)
    else:
        weights = resolve_weights(spec, expect, img_size, patch_size)
        arch = weights.arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(arch)
    info: dict[str, Any] = {"img_size": arch.img_size, "patch_size": arch.patch_size}
    if random_init or weights is None:
        source, kind = f"{RANDOM_PREFIX}{arch.name}", "random"
        info["seed"] = seed
    else:
        source, kind = weights.source, weights.kind
        weights.load_into(model)
        info.update(weights.info)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Encoder(model, arch, source, kind, info)
