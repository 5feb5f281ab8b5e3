"""BYOL (Grill et al. 2020): online network with predictor regresses an EMA target network.

* Online: backbone -> projector -> predictor; target: an EMA copy of backbone + projector
  (vitssl.models.methods.base.EMAMethod).
* Loss: ``2 - 2 cos(p, z_target)`` for (view 1 -> view 2) plus (view 2 -> view 1).
* Target decay: ``1 - (1 - base) (cos(pi k / K) + 1) / 2``, a pure function of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vitssl.models.backbones import create_backbone, embed, embed_dim
from vitssl.models.heads import maybe_sync_batchnorm, projection_mlp
from vitssl.models.losses import normalized_mse_loss
from vitssl.models.methods.base import Batch, EMAMethod
from vitssl.models.registry import MethodConfig, register_method


@dataclass
class BYOLConfig(MethodConfig):
    """BYOL's hyper-parameters (defaults: the paper's ImageNet settings)."""

    has_teacher: ClassVar[bool] = True

    name: str = "byol"
    """The method's registry name."""
    proj_hidden_dim: int = 4096
    """Hidden width of the projector and of the predictor."""
    proj_out_dim: int = 256
    """Output dimension of the projector and of the predictor."""
    momentum: float = 0.996
    """Base target decay rate tau; it rises to 1 by a cosine over training."""
    predictor_lr_scale: float = 1.0
    """Learning-rate multiplier of the predictor. A predictor that adapts faster than the
    encoder it predicts keeps a non-contrastive method from collapsing early (Tian et al.,
    2021; SimSiam's fixed predictor lr serves the same end): 10 in the short CIFAR runs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proj_hidden_dim < 1 or self.proj_out_dim < 1:
            raise ValueError("method.proj_hidden_dim and proj_out_dim must be >= 1")
        if self.predictor_lr_scale <= 0:
            raise ValueError("method.predictor_lr_scale must be > 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError("method.momentum must be in [0, 1]")


class BYOL(EMAMethod):
    def __init__(self, cfg: BYOLConfig, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d, h, p = embed_dim(backbone), cfg.proj_hidden_dim, cfg.proj_out_dim
        self.projector = projection_mlp(d, h, p, num_layers=2, last_bn=False)
        self.predictor = projection_mlp(p, h, p, num_layers=2, last_bn=False)
        maybe_sync_batchnorm(self)  # before the copy: the target syncs its norms too
        self.init_teacher(("backbone", "projector"), cfg.momentum)

    def param_lr_scale(self, name: str) -> float:
        return self.cfg.predictor_lr_scale if name.startswith("predictor.") else 1.0

    def forward(self, batch: Batch) -> dict[str, Any]:
        views = batch["views"]
        if len(views) != 2:
            raise ValueError(f"BYOL needs 2 views per image, got {len(views)}")
        x1, x2 = views
        self.teacher.follow(x1, self.training)
        h1, h2 = embed(self.backbone, x1), embed(self.backbone, x2)  # (B, D)
        p1 = self.predictor(self.projector(h1))  # (B, P)
        p2 = self.predictor(self.projector(h2))
        t1, t2 = self.teacher_output(x1, "projector"), self.teacher_output(x2, "projector")
        loss = normalized_mse_loss(p1, t2) + normalized_mse_loss(p2, t1)
        return {"loss": loss, "embeddings": (h1.detach(), h2.detach())}


@register_method("byol", BYOLConfig)
def build_byol(method_cfg: BYOLConfig, model_cfg: Any) -> BYOL:
    return BYOL(method_cfg, create_backbone(model_cfg))
