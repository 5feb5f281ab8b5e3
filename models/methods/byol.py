"""BYOL (Grill et al. 2020): online network with predictor regresses an EMA target network.

* Online: backbone -> projector -> predictor; target: an EMA copy of backbone + projector
  (models.ema.EMATeacher: float32, not a registered submodule, saved via ``extra_state()``).
* Loss: ``2 - 2 cos(p, z_target)`` for (view 1 -> view 2) plus (view 2 -> view 1).
* Target decay: ``1 - (1 - base) (cos(pi k / K) + 1) / 2``, a pure function of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.backbones import create_backbone, embed, embed_dim
from models.ema import EMATeacher, cosine_momentum
from models.heads import maybe_sync_batchnorm, projection_mlp
from models.losses import normalized_mse_loss
from models.methods.base import Batch, Method, StepContext
from models.registry import register_method
from train.config import ConfigError, MethodConfig


@dataclass
class BYOLConfig(MethodConfig):
    """BYOL's hyper-parameters (defaults: the paper's ImageNet settings)."""

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
        if self.proj_hidden_dim < 1 or self.proj_out_dim < 1:
            raise ConfigError("method.proj_hidden_dim and proj_out_dim must be >= 1")
        if self.predictor_lr_scale <= 0:
            raise ConfigError("method.predictor_lr_scale must be > 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError("method.momentum must be in [0, 1]")


class BYOL(Method):
    def __init__(self, cfg: BYOLConfig, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d, h, p = embed_dim(backbone), cfg.proj_hidden_dim, cfg.proj_out_dim
        self.projector = projection_mlp(d, h, p, num_layers=2, last_bn=False)
        self.predictor = projection_mlp(p, h, p, num_layers=2, last_bn=False)
        maybe_sync_batchnorm(self)  # before the copy: the target syncs its norms too
        # A plain object, so not registered: see models.ema.
        self.teacher = EMATeacher({"backbone": self.backbone, "projector": self.projector})

    def teacher_to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Move the teacher to ``device``. Its weights stay float32 whatever ``dtype`` (the run's
        compute dtype): it computes in the inputs' dtype under autocast (see models.ema)."""
        self.teacher.to(device)

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        with self.teacher.autocast(x):
            return self.teacher["projector"](embed(self.teacher["backbone"], x)).float()

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
        t1, t2 = self._target(x1), self._target(x2)  # (B, P)
        loss = normalized_mse_loss(p1, t2) + normalized_mse_loss(p2, t1)
        return {"loss": loss, "embeddings": (h1.detach(), h2.detach())}

    def after_step(self, ctx: StepContext) -> None:
        m = cosine_momentum(self.cfg.momentum, ctx.progress)
        self.teacher.update({"backbone": self.backbone, "projector": self.projector}, m)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict(state)


@register_method("byol", BYOLConfig)
def build_byol(method_cfg: BYOLConfig, model_cfg: Any) -> BYOL:
    return BYOL(method_cfg, create_backbone(model_cfg))
