"""ViT backbones on timm, with visible-token encoding (MAE) and fixed sin-cos positions.

The backbone is a :class:`MaskedViT`, a subclass of timm's ``VisionTransformer`` that adds
methods and one setting only, so its state dict loads into ``timm.create_model`` of the same
name and timm's API (``forward``, ``no_weight_decay``, ...) is unchanged:

* :func:`create_vit` builds it with fixed 2-D sin-cos position embeddings (frozen),
  attention through ``F.scaled_dot_product_attention``, no classifier and timm's dynamic
  image size (crops of another size than ``img_size``, e.g. DINO's local crops, get the
  position table resampled to their grid).
* ``MaskedViT.forward_features(x, ids_keep)`` encodes all tokens or only the visible subset
  ``ids_keep``, with optional selective activation checkpointing (every k-th block);
  ``vit(x, ids_keep=..., tokens=True)`` returns those tokens through the module call, so that
  ZeRO-3's forward hooks gather the class token and position table like any other parameter
  (no parameter is registered with DeepSpeed by hand).
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitssl.models.pos_embed import sincos_2d


class MaskedViT(VisionTransformer):
    """timm's ViT with visible-token encoding and checkpointing of every k-th block.

    timm builds the model from its registry (where each name's depth, width, heads and
    norms live) and :func:`create_vit` promotes it to this class, which holds no state of
    its own beyond ``ckpt_every``: constructor arguments are timm's, not repeated here."""

    ckpt_every: int = 0
    """Checkpoint the activations of every k-th block while training (0: none)."""

    def set_grad_checkpointing_every(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"grad_checkpointing_every must be >= 0, got {every}")
        self.ckpt_every = every

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        ids_keep: torch.Tensor | None = None,
        tokens: bool = False,
    ) -> torch.Tensor:
        """timm's forward (the pooled embedding); ``tokens=True``: the normalised tokens
        ``(B, 1 + L', D)`` of :meth:`forward_features` with ``ids_keep``."""
        feats = self.forward_features(x, ids_keep, attn_mask, is_causal)
        return feats if tokens else self.forward_head(feats)

    def forward_features(  # type: ignore[override]
        self,
        x: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Encode ``x: (B, 3, H, W)``; returns normalised tokens ``(B, 1 + L', D)``, class first.

        With ``ids_keep: (B, L')`` only those patches are encoded (MAE); else all ``L``.
        ``attn_mask`` and ``is_causal`` are timm's (``forward`` passes them on)."""
        x = self._pos_embed(self.patch_embed(x))  # (B, 1 + L, D): timm's, any image size
        if ids_keep is not None:
            index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, L', D)
            x = torch.cat([x[:, :1], torch.gather(x[:, 1:], dim=1, index=index)], dim=1)
        x = self.norm_pre(self.patch_drop(x))
        every = self.ckpt_every
        for i, block in enumerate(self.blocks):
            if attn_mask is not None or is_causal:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
            elif every and self.training and torch.is_grad_enabled() and i % every == 0:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def create_vit(
    name: str,
    img_size: int,
    patch_size: int,
    drop_path_rate: float = 0.0,
    grad_checkpointing_every: int = 0,
) -> MaskedViT:
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
            dynamic_img_size=True,
        )
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"model.name={name!r}: {e}") from None
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"model.name={name!r} is not a timm VisionTransformer")
    if (
        vit.pos_embed is None
        or vit.cls_token is None
        or vit.no_embed_class
        or vit.reg_token is not None
        or type(vit) is not VisionTransformer
    ):
        raise ValueError(
            f"model.name={name!r}: needs a plain VisionTransformer with a class token, a learned"
            " position table and no register tokens"
        )
    grid = img_size // patch_size
    with torch.no_grad():
        pe = sincos_2d(vit.embed_dim, grid, cls_token=True)  # (1 + G*G, D)
        vit.pos_embed.copy_(pe.unsqueeze(0))
    vit.pos_embed.requires_grad_(False)
    for block in vit.blocks:
        block.attn.fused_attn = True  # type: ignore[union-attr]  # F.sdpa: flash / mem-efficient
    vit.__class__ = MaskedViT  # methods only: see MaskedViT
    assert isinstance(vit, MaskedViT)
    vit.set_grad_checkpointing_every(grad_checkpointing_every)
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
    """``vit.forward_features(imgs, ids_keep)`` of a :class:`MaskedViT`: ``(B, 1 + L', D)``,
    through the module call (ZeRO-3 gathers the ViT's own parameters in its hooks)."""
    assert isinstance(vit, MaskedViT), type(vit)  # create_vit builds every ViT here
    out: torch.Tensor = vit(imgs, ids_keep=ids_keep, tokens=True)
    return out


def pool_tokens(tokens: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """``(B, 1 + L, D) -> (B, D)``: the class token, or the mean of the patch tokens."""
    if kind == "cls":
        return tokens[:, 0]
    if kind == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pooling must be 'cls' or 'avg', got {kind!r}")
