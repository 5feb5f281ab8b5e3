"""SimSiam (Chen & He 2021): a siamese encoder, a predictor, and a stop-gradient.

Loss: ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``D = -cos``. The paper trains the
predictor with a fixed (not decayed) learning rate; that is the trainer's schedule to set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vitssl.models.backbones import create_backbone, embed, embed_dim
from vitssl.models.heads import maybe_sync_batchnorm, projection_mlp
from vitssl.models.losses import negative_cosine_loss
from vitssl.models.methods.base import Batch, Method
from vitssl.models.registry import MethodConfig, register_method


@dataclass
class SimSiamConfig(MethodConfig):
    """SimSiam's hyper-parameters (defaults: the paper's ImageNet settings)."""

    name: str = "simsiam"
    """The method's registry name."""
    proj_layers: int = 3
    """Projector depth (3 on ImageNet, 2 in the paper's CIFAR variant)."""
    proj_dim: int = 2048
    """Hidden and output width of the projector (the predictor's input and output)."""
    pred_hidden_dim: int = 512
    """Width of the predictor's bottleneck."""
    predictor_lr_scale: float = 1.0
    """Learning-rate multiplier of the predictor. A predictor that adapts faster than the
    encoder it predicts keeps a non-contrastive method from collapsing early (Tian et al.,
    2021; SimSiam's fixed predictor lr serves the same end): 10 in the short CIFAR runs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.predictor_lr_scale <= 0:
            raise ValueError("method.predictor_lr_scale must be > 0")
        if self.proj_layers < 1 or self.proj_dim < 1 or self.pred_hidden_dim < 1:
            raise ValueError("method.proj_layers, proj_dim and pred_hidden_dim must be >= 1")


class SimSiam(Method):
    def __init__(self, cfg: SimSiamConfig, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d = embed_dim(backbone)
        self.projector = projection_mlp(
            d, cfg.proj_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True, last_bn_affine=False
        )
        self.predictor = projection_mlp(
            cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, num_layers=2, last_bn=False
        )
        maybe_sync_batchnorm(self)

    def param_lr_scale(self, name: str) -> float:
        return self.cfg.predictor_lr_scale if name.startswith("predictor.") else 1.0

    def forward(self, batch: Batch) -> dict[str, Any]:
        views = batch["views"]
        if len(views) != 2:
            raise ValueError(f"SimSiam needs 2 views per image, got {len(views)}")
        x1, x2 = views
        h1, h2 = embed(self.backbone, x1), embed(self.backbone, x2)  # (B, D)
        z1, z2 = self.projector(h1), self.projector(h2)  # (B, P)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = negative_cosine_loss(p1, z2) / 2 + negative_cosine_loss(p2, z1) / 2
        return {"loss": loss, "embeddings": (h1.detach(), h2.detach())}


@register_method("simsiam", SimSiamConfig)
def build_simsiam(method_cfg: SimSiamConfig, model_cfg: Any) -> SimSiam:
    return SimSiam(method_cfg, create_backbone(model_cfg))
