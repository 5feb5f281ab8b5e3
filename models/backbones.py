"""``create_backbone(model_cfg)``: any timm ViT (see models.vit) or ResNet-18/50.

Every backbone maps images ``(B, 3, H, W)`` to a pooled embedding ``(B, D)`` through
:func:`embed`; ``embed_dim(backbone)`` gives ``D``. The backbone never computes a loss.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.vit import create_vit, forward_tokens, pool_tokens


def is_vit(backbone: nn.Module) -> bool:
    return isinstance(backbone, VisionTransformer)


def create_backbone(model_cfg: Any) -> nn.Module:
    """Build the backbone named by ``model_cfg.name`` (a train.config.ModelConfig)."""
    name: str = model_cfg.name
    every = model_cfg.grad_checkpointing_every if model_cfg.grad_checkpointing else 0
    if name.startswith(("vit_", "deit_")):
        return create_vit(
            name,
            img_size=model_cfg.img_size,
            patch_size=model_cfg.patch_size,
            drop_path_rate=model_cfg.drop_path_rate,
            grad_checkpointing_every=every,
        )
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=0, drop_path_rate=model_cfg.drop_path_rate
        )
    except RuntimeError as e:
        raise ValueError(f"model.name={name!r}: {e}") from None
    if getattr(model_cfg, "cifar_stem", False):
        _cifar_stem(model)
    if every:
        model.set_grad_checkpointing(True)  # type: ignore[operator]
    return model


def _cifar_stem(model: nn.Module) -> None:
    """32 px stem: ResNet 3x3 stride-1 conv without max-pool; conv_stem models at stride 1."""
    from models.students import apply_cifar_stem

    apply_cifar_stem(model)


def embed_dim(backbone: nn.Module) -> int:
    # MobileNetV3/V4 pool into a wider head layer: the pooled output is head_hidden_size
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)  # type: ignore[arg-type]


def embed(backbone: nn.Module, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """Pooled embedding ``(B, D)``: ViT class token (or patch mean), CNN global average."""
    if is_vit(backbone):
        return pool_tokens(forward_tokens(backbone, imgs), pool)  # type: ignore[arg-type]
    return backbone(imgs)
