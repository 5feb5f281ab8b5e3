"""``create_backbone(model_cfg, role)``: the one place that turns a model name into a network.

* ``role="encoder"`` (pretraining, evaluation, fine-tuning): a timm ViT (a
  :class:`models.vit.MaskedViT`, see models.vit) or any other timm model without classifier
  (ResNet-18/50, ...), with the CIFAR stem and gradient checkpointing the config asks for.
* ``role="student"`` (distillation): a timm CNN built for export
  (``exportable=True``: static padding, plain activations), checked to end in a feature map
  of at least 2x2 at the training resolution (see models.students).

Whether a name is a ViT is timm's registry's answer (:func:`is_vit_name`), not a name
prefix. Every backbone maps images ``(B, 3, H, W)`` to a pooled embedding ``(B, D)`` through
:func:`embed`; ``embed_dim(backbone)`` gives ``D``. The backbone never computes a loss.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitssl.models.students import STUDENTS, apply_cifar_stem, check_student
from vitssl.models.vit import create_vit, forward_tokens, pool_tokens

Role = Literal["encoder", "student"]
ROLES: tuple[Role, ...] = ("encoder", "student")


class BackboneSpec(Protocol):
    """The fields of the run's ``model`` section that build a backbone."""

    name: str
    img_size: int
    patch_size: int
    drop_path_rate: float
    grad_checkpointing: bool
    grad_checkpointing_every: int
    cifar_stem: bool


def is_vit(backbone: nn.Module) -> bool:
    return isinstance(backbone, VisionTransformer)


def is_vit_name(name: str) -> bool:
    """Whether timm registers ``name`` in its ViT modules (vision_transformer, deit)."""
    return bool(timm.models.is_model_in_modules(name, ["vision_transformer", "deit"]))


def timm_args(name: str, img_size: int, patch_size: int) -> dict[str, Any]:
    """Arguments beyond the name that rebuild the backbone with ``timm.create_model``."""
    return {"img_size": img_size, "patch_size": patch_size} if is_vit_name(name) else {}


def create_backbone(model_cfg: BackboneSpec, role: Role = "encoder") -> nn.Module:
    """Build the backbone named by ``model_cfg.name`` for ``role`` (see the module docstring)."""
    name = model_cfg.name
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    vit = is_vit_name(name)
    if role == "student" and vit:
        raise ValueError(f"model.name={name!r}: the student must be a CNN (e.g. {STUDENTS[0]})")
    every = model_cfg.grad_checkpointing_every if model_cfg.grad_checkpointing else 0
    if vit:
        return create_vit(
            name,
            img_size=model_cfg.img_size,
            patch_size=model_cfg.patch_size,
            drop_path_rate=model_cfg.drop_path_rate,
            grad_checkpointing_every=every,
        )
    kwargs: dict[str, Any] = {"exportable": True} if role == "student" else {}
    if model_cfg.drop_path_rate:
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"model.name={name!r}: {e}") from None
    if model_cfg.cifar_stem:
        apply_cifar_stem(model)
    if every:
        model.set_grad_checkpointing(True)  # type: ignore[operator]
    if role == "student":
        check_student(model, name, model_cfg.img_size, model_cfg.cifar_stem)
    return model


def embed_dim(backbone: nn.Module) -> int:
    # MobileNetV3/V4 pool into a wider head layer: the pooled output is head_hidden_size
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)  # type: ignore[arg-type]


def embed(backbone: nn.Module, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """Pooled embedding ``(B, D)``: ViT class token (or patch mean), CNN global average.

    A ViT's pooled tokens go through its ``fc_norm``, as in timm's ``forward_head``: an
    identity except in a model fine-tuned with ``global_pool = "avg"``, whose final norm
    moved there (the features of k-NN, probes and exports are then the head's input)."""
    if is_vit(backbone):
        pooled = pool_tokens(forward_tokens(backbone, imgs), pool)  # type: ignore[arg-type]
        fc_norm: nn.Module = backbone.fc_norm  # type: ignore[assignment]
        return fc_norm(pooled)  # type: ignore[no-any-return]
    return backbone(imgs)
