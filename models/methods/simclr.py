"""SimCLR (Chen et al. 2020): two views, a projector, NT-Xent over the global batch.

Both views go through the encoder as one batch (batch-norm statistics over 2B images, as in
the authors' code); negatives come from every rank with their gradient (models.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vitssl.models.backbones import create_backbone, embed, embed_dim
from vitssl.models.heads import maybe_sync_batchnorm, projection_mlp
from vitssl.models.losses import nt_xent_loss
from vitssl.models.methods.base import Batch, Method
from vitssl.models.registry import MethodConfig, register_method


@dataclass
class SimCLRConfig(MethodConfig):
    """SimCLR's hyper-parameters (defaults: the paper's ImageNet settings)."""

    name: str = "simclr"
    """The method's registry name."""
    temperature: float = 0.1
    """NT-Xent temperature (0.1 for ImageNet/ViT; 0.2 to 0.5 for CIFAR)."""
    proj_layers: int = 2
    """Projector depth: 2 in SimCLR v1, 3 in SimCLR v2."""
    proj_hidden_dim: int = 2048
    """Width of the projector's hidden layers."""
    proj_out_dim: int = 128
    """Dimension of the projection the loss compares."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError("method.temperature must be > 0")
        if self.proj_layers < 1 or self.proj_hidden_dim < 1 or self.proj_out_dim < 1:
            raise ValueError("method.proj_layers, proj_hidden_dim and proj_out_dim must be >= 1")


class SimCLR(Method):
    def __init__(self, cfg: SimCLRConfig, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = projection_mlp(
            embed_dim(backbone), cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.proj_layers, True
        )
        maybe_sync_batchnorm(self)

    def forward(self, batch: Batch) -> dict[str, Any]:
        views = batch["views"]
        if len(views) != 2:
            raise ValueError(f"SimCLR needs 2 views per image, got {len(views)}")
        b = views[0].shape[0]
        h = embed(self.backbone, torch.cat(views))  # (2B, D)
        z = self.projector(h)  # (2B, P)
        loss = nt_xent_loss(z[:b], z[b:], self.cfg.temperature)
        return {"loss": loss, "embeddings": (h[:b].detach(), h[b:].detach())}


@register_method("simclr", SimCLRConfig)
def build_simclr(method_cfg: SimCLRConfig, model_cfg: Any) -> SimCLR:
    return SimCLR(method_cfg, create_backbone(model_cfg))
