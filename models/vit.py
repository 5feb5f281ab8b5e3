"""ViT backbones on timm, with visible-token encoding (MAE) and fixed sin-cos positions.

The backbone *is* a timm ``VisionTransformer`` (so its state dict loads into
``timm.create_model`` of the same name); the extra behaviour lives in functions here:

* :func:`create_vit` builds it with fixed 2-D sin-cos position embeddings (frozen),
  attention through ``F.scaled_dot_product_attention`` and no classifier.
* :func:`forward_tokens` encodes all tokens or only the visible subset ``ids_keep``,
  with optional selective activation checkpointing (every k-th block).
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.pos_embed import sincos_2d


def create_vit(
    name: str,
    img_size: int,
    patch_size: int,
    drop_path_rate: float = 0.0,
    grad_checkpointing_every: int = 0,
) -> VisionTransformer:
    """A timm ViT without head; ``grad_checkpointing_every=k>0`` checkpoints every k-th block."""
    try:
        vit = timm.create_model(
            name,
            pretrained=False,
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            global_pool="token",
            class_token=True,
        )
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"model.name={name!r}: {e}") from None
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"model.name={name!r} is not a timm VisionTransformer")
    if vit.pos_embed is None or vit.cls_token is None or getattr(vit, "no_embed_class", False):
        raise ValueError(f"model.name={name!r}: needs a class token and a learned position table")
    grid = img_size // patch_size
    with torch.no_grad():
        pe = sincos_2d(vit.embed_dim, grid, cls_token=True)  # (1 + G*G, D)
        vit.pos_embed.copy_(pe.unsqueeze(0))
    vit.pos_embed.requires_grad_(False)
    for block in vit.blocks:
        block.attn.fused_attn = True  # type: ignore[union-attr]  # F.sdpa: flash / mem-efficient
    vit.ckpt_every = grad_checkpointing_every  # type: ignore[assignment]
    # MAE's initialisation: patch projection like a linear layer, tokens N(0, 0.02).
    w = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(vit.cls_token, std=0.02)
    return vit


def num_patches(vit: VisionTransformer) -> int:
    return vit.patch_embed.num_patches


def forward_tokens(
    vit: VisionTransformer, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Encode ``imgs: (B, 3, H, W)``; returns normalised tokens ``(B, 1 + L', D)``, class first.

    With ``ids_keep: (B, L')`` only those patches are encoded (MAE); else all ``L``.
    """
    pos_embed, cls_token = vit.pos_embed, vit.cls_token
    assert pos_embed is not None and cls_token is not None  # create_vit guarantees both
    x = vit.patch_embed(imgs)  # (B, L, D)
    x = x + pos_embed[:, 1:, :]
    if ids_keep is not None:
        index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, L', D)
        x = torch.gather(x, dim=1, index=index)
    cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # (B, 1, D)
    x = torch.cat([cls, x], dim=1)
    x = vit.norm_pre(x)
    every = int(getattr(vit, "ckpt_every", 0))
    for i, block in enumerate(vit.blocks):
        if every and vit.training and torch.is_grad_enabled() and i % every == 0:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return vit.norm(x)


def token_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The class token and position table of every ViT inside ``model``.

    :func:`forward_tokens` reads them without calling ``VisionTransformer.forward``, so under
    ZeRO-3 they must be registered as external parameters of the module whose forward runs
    (``deepspeed.zero.register_external_parameter``), or they stay partitioned and empty.
    """
    return [
        p
        for m in model.modules()
        if isinstance(m, VisionTransformer)
        for p in m.parameters(recurse=False)
    ]


def pool_tokens(tokens: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """``(B, 1 + L, D) -> (B, D)``: the class token, or the mean of the patch tokens."""
    if kind == "cls":
        return tokens[:, 0]
    if kind == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pooling must be 'cls' or 'avg', got {kind!r}")
