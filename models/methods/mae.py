"""Masked autoencoder (He et al., 2021) on a timm ViT encoder.

The encoder sees only the visible patches; a light decoder (depth and width from the
config) reconstructs the pixels of the masked ones. The loss is the mean squared error
over masked patches only, optionally on per-patch normalised pixels (``norm_pix_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from vitssl.models.methods.base import Batch, Method
from vitssl.models.pos_embed import sincos_2d
from vitssl.models.registry import MethodConfig, register_method
from vitssl.models.vit import MaskedViT, create_vit, forward_tokens, num_patches


@dataclass
class MAEConfig(MethodConfig):
    """MAE hyper-parameters; defaults are the paper's."""

    mask_ratio: float = 0.75
    """Fraction of patches removed from the encoder's input."""
    decoder_dim: int = 512
    """Width of the decoder."""
    decoder_depth: int = 8
    """Transformer blocks in the decoder."""
    decoder_heads: int = 16
    """Attention heads of the decoder."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (better features, per the paper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError("method.mask_ratio must be in (0, 1)")
        if self.decoder_depth < 1 or self.decoder_dim < 1 or self.decoder_heads < 1:
            raise ValueError("method.decoder_depth, decoder_dim and decoder_heads must be >= 1")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError("method.decoder_heads must divide method.decoder_dim")
        if self.decoder_dim % 4:
            raise ValueError("method.decoder_dim must be divisible by 4 (2-D sin-cos positions)")


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, 3, H, W) -> (B, L, p*p*3)``, patches row-major, pixels (p, q, c) as in MAE."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """``(B, L, p*p*C) -> (B, C, H, W)``; the inverse of :func:`patchify` for square grids."""
    h = round(x.shape[1] ** 0.5)
    if h * h != x.shape[1]:
        raise ValueError(f"unpatchify needs a square number of patches, got {x.shape[1]}")
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p, c=channels)


def random_masking(
    batch: int, length: int, mask_ratio: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffling by ``noise: (B, L)``; the lowest-noise patches stay visible.

    Returns ``ids_keep: (B, K)``, ``mask: (B, L)`` (1 = removed) and ``ids_restore: (B, L)``.
    """
    assert noise.shape == (batch, length), noise.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    # the reference fills ones, zeroes the first ``keep`` and gathers by ids_restore: a patch
    # is masked exactly when its rank in the shuffle is >= keep (one comparison, no gather)
    mask = (ids_restore >= keep).to(torch.float32)
    return ids_keep, mask, ids_restore


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool
) -> torch.Tensor:
    """Mean squared error over masked patches; ``pred, target: (B, L, P)``, ``mask: (B, L)``."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


@torch.no_grad()
def mae_init_(model: MAE) -> None:
    """The official ``MaskedAutoencoderViT.initialize_weights``, encoder included: the patch
    projection Xavier-uniform on its flattened ``(D, 3*p*p)`` weight, class and mask tokens
    N(0, 0.02), then one ``apply`` over the whole model: every ``nn.Linear`` Xavier-uniform
    with zero bias (encoder qkv/proj/fc1/fc2 too, not timm's truncated normal), every
    LayerNorm weight 1, bias 0. Position tables stay fixed sin-cos."""
    w = model.backbone.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    assert model.backbone.cls_token is not None  # create_vit guarantees it
    nn.init.normal_(model.backbone.cls_token, std=0.02)
    nn.init.normal_(model.mask_token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAE(Method):
    """Encoder = ``self.backbone`` (a timm ViT, exported); decoder is dropped after pretraining."""

    backbone: MaskedViT

    def __init__(self, cfg: MAEConfig, backbone: MaskedViT) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.patch_size = int(backbone.patch_embed.patch_size[0])
        length = num_patches(backbone)
        grid = round(length**0.5)
        dim = cfg.decoder_dim
        self.decoder_embed = nn.Linear(backbone.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(dim, grid, cls_token=True).unsqueeze(0), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(cfg.decoder_depth)
        )
        for block in self.decoder_blocks:
            block.attn.fused_attn = True  # type: ignore[union-attr]
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * 3)
        mae_init_(self)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent: (B, 1 + K, D_enc)`` -> predicted pixels ``(B, L, p*p*3)``."""
        x = self.decoder_embed(latent)  # (B, 1 + K, D)
        b, length = ids_restore.shape
        masked = self.mask_token.expand(b, length + 1 - x.shape[1], -1)  # (B, L - K, D)
        x_ = torch.cat([x[:, 1:], masked], dim=1)  # (B, L, D), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, D)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_with_noise(
        self, imgs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, prediction ``(B, L, P)`` and mask ``(B, L)`` for a given masking noise."""
        length = num_patches(self.backbone)
        ids_keep, mask, ids_restore = random_masking(
            imgs.shape[0], length, self.cfg.mask_ratio, noise
        )
        latent = forward_tokens(self.backbone, imgs, ids_keep)
        pred = self.decode(latent, ids_restore)
        loss = masked_mse(pred, patchify(imgs, self.patch_size), mask, self.cfg.norm_pix_loss)
        return loss, pred, mask

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        imgs = batch["views"][0]
        noise = batch.get("mask_noise")
        if noise is None:
            noise = torch.rand(imgs.shape[0], num_patches(self.backbone), device=imgs.device)
        loss, _, mask = self.forward_with_noise(imgs, noise)
        return {"loss": loss, "mask_ratio": mask.float().mean().detach()}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Pictures ``(B, 3, H, W)`` of visible patches pasted over the reconstruction.

        With ``norm_pix_loss`` the predicted patches are de-normalised with the statistics of
        the true patches, as in the MAE visualisation notebook.
        """
        if noise is None:
            noise = torch.rand(imgs.shape[0], num_patches(self.backbone), device=imgs.device)
        _, pred, mask = self.forward_with_noise(imgs, noise)
        target = patchify(imgs, self.patch_size).float()
        pred = pred.float()
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        m = mask.unsqueeze(-1)  # (B, L, 1)
        return unpatchify(pred * m + target * (1 - m), self.patch_size)

    @torch.no_grad()
    def visualize(self, batch: Batch) -> torch.Tensor | None:
        """Rows of (original, masked input, reconstruction) for up to 8 images, in [0, 1]."""
        from torchvision.utils import make_grid

        imgs = batch["views"][0][:8]
        noise = torch.rand(
            imgs.shape[0], num_patches(self.backbone), generator=torch.Generator().manual_seed(0)
        ).to(imgs.device)
        recon = self.reconstruct(imgs, noise)
        _, _, mask = self.forward_with_noise(imgs, noise)
        keep = unpatchify(
            (1 - mask).unsqueeze(-1).expand(-1, -1, self.patch_size**2 * 3), self.patch_size
        )
        masked = imgs.float() * keep
        rows = torch.stack([imgs.float(), masked, recon], dim=1).flatten(0, 1)  # (3B, 3, H, W)
        return make_grid(denormalize(rows), nrow=3)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images back to [0, 1]."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@register_method("mae", MAEConfig)
def build_mae(cfg: MAEConfig, model_cfg: Any) -> MAE:
    every = model_cfg.grad_checkpointing_every if model_cfg.grad_checkpointing else 0
    backbone = create_vit(
        model_cfg.name,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        drop_path_rate=model_cfg.drop_path_rate,
        grad_checkpointing_every=every,
    )
    return MAE(cfg, backbone)
