"""Edge students: any timm CNN, built for export, with an optional CIFAR stem.

* ``vitssl.models.backbones.create_backbone(cfg, "student")`` builds
  ``timm.create_model(name, num_classes=0, exportable=True)`` (timm then picks static padding
  and plain activations, ops that ONNX/INT8 export handles) and :func:`check_student` checks
  that its last feature map is at least 2x2 at the training resolution.
* :func:`apply_cifar_stem` adapts the stem to 32 px images: ResNets get a 3x3 stride-1 conv
  and no max-pool (SimCLR's CIFAR variant); models with a ``conv_stem`` (MobileNetV2/V3/V4,
  EfficientNet) get that conv at stride 1. Total stride 32 -> 16 (ResNet: 32 -> 8), so at
  32 px MobileNetV3's last map is 2x2 instead of 1x1, the smallest on which patch-token
  distillation still has a spatial layout (:func:`student_shape` measures it).
* :func:`student_features` returns the last feature map ``(B, C, h, w)`` and the pooled
  embedding ``(B, E)`` of one forward pass. ``E`` is what ``model(x)`` returns: for MobileNetV3
  and V4 that is the 1280-wide ``conv_head`` output, not ``num_features`` (960).

The student's state dict is exactly timm's, so an export loads into
``timm.create_model(name, num_classes=0)`` (plus :func:`apply_cifar_stem`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

STUDENTS = (
    "resnet18",
    "mobilenetv2_100",
    "efficientnet_lite0",
    "mobilenetv4_conv_small",
    "mobilenetv3_large_100",
    "mobilenetv3_small_100",
    "efficientnet_b0",
)
"""First-class students (each with a CIFAR stem), built by the tests; any timm CNN with
``forward_features``/``forward_head`` works. INT8 on x86 CPUs favours plain convolutions and
ReLU: ResNet-18 gains 3-4x from VNNI, the depthwise MobileNetV2 / EfficientNet-Lite0 about
2.2x, MobileNetV3 (hard-swish, squeeze-excitation gates) 1.4x (README, "Distillation and
INT8 export")."""
MIN_FEATURE_MAP = 2
"""Smallest side of the last feature map accepted at the training resolution."""


@dataclass(frozen=True)
class StudentShape:
    """What the heads need to know about a student at one input size."""

    embed_dim: int
    """Width of the pooled embedding ``model(x)``."""
    feature_dim: int
    """Channels of the last feature map ``forward_features(x)``."""
    feature_hw: tuple[int, int]
    """Height and width of that map."""


def apply_cifar_stem(model: nn.Module) -> None:
    """Make the stem stride 1 for 32 px inputs (see the module docstring); in place."""
    stem = getattr(model, "conv_stem", None)
    if isinstance(stem, nn.Conv2d):
        stem.stride = (1, 1)  # 3x3 kernel, padding 1: the map keeps the input size
        return
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(
            3, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        model.maxpool = nn.Identity()
        return
    raise ValueError(
        f"a CIFAR stem needs a ResNet (conv1 + maxpool) or a model with conv_stem, "
        f"not {type(model).__name__}"
    )


def student_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: (B, 3, H, W)`` -> last feature map ``(B, C, h, w)`` and pooled ``(B, E)``."""
    fmap = model.forward_features(x)  # type: ignore[operator]
    pooled = model.forward_head(fmap)  # type: ignore[operator]  # num_classes=0: no classifier
    return fmap, pooled


@torch.no_grad()
def student_shape(model: nn.Module, img_size: int) -> StudentShape:
    """Measure the embedding width and last feature map of ``model`` at ``img_size`` px."""
    was_training = model.training
    model.eval()  # batch norm on one image
    try:
        p = next(model.parameters())
        x = torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype)
        fmap, pooled = student_features(model, x)
    finally:
        model.train(was_training)
    return StudentShape(int(pooled.shape[1]), int(fmap.shape[1]), (fmap.shape[2], fmap.shape[3]))


def check_student(model: nn.Module, name: str, img_size: int, cifar_stem: bool) -> None:
    """Refuse a student without timm's feature API or with a last map under 2x2."""
    if not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
        raise ValueError(f"model.name={name!r} lacks timm's forward_features/forward_head")
    h, w = student_shape(model, img_size).feature_hw
    if min(h, w) < MIN_FEATURE_MAP:
        hint = "" if cifar_stem else "; set model.cifar_stem=true for small images"
        raise ValueError(
            f"{name} at {img_size} px ends in a {h}x{w} feature map "
            f"(< {MIN_FEATURE_MAP}x{MIN_FEATURE_MAP}){hint}"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
