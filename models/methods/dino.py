"""DINO (Caron et al. 2021): self-distillation with no labels, multi-crop.

* Student: backbone + :class:`models.heads.DINOHead` on every crop; teacher: an EMA copy of
  both (models.ema.EMATeacher: float32, unregistered, saved via ``extra_state()``) that sees
  the two global crops only.
* Teacher outputs are centred (``center``: EMA with ``center_momentum`` of the batch mean
  over all ranks) and sharpened (temperature warmed up linearly from
  ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs``); or,
  with ``centering = "sinkhorn_knopp"`` (DINOv2), balanced over the prototypes across the
  global batch by :func:`models.losses.sinkhorn_knopp` at that temperature (the EMA center
  is then not updated: nothing reads it).
* Loss: cross-entropy between each global crop's teacher distribution and the student's
  distribution of every other crop, averaged over those pairs.
* The head's last layer gets no gradient during the first ``freeze_last_layer`` epochs
  (``before_step`` sets ``DINOHead.last_layer_frozen``, which detaches it in the forward).
* Teacher momentum: cosine from ``momentum`` to 1. All schedules are functions of the step.

Batches: ``views = [global_1, global_2, local_1, ..., local_n]``, the locals smaller. A ViT
encodes the local crops with its position table resampled to their grid (timm's dynamic
image size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import create_backbone, embed, embed_dim
from models.distributed import all_reduce_mean_
from models.ema import EMATeacher, cosine_momentum
from models.heads import DINOHead, maybe_sync_batchnorm
from models.losses import dino_loss, sinkhorn_knopp
from models.methods.base import Batch, Method, StepContext
from models.registry import register_method
from train.config import ConfigError, MethodConfig


@dataclass
class DINOConfig(MethodConfig):
    """DINO's hyper-parameters (defaults: the authors' main_dino.py)."""

    name: str = "dino"
    """The method's registry name."""
    export_teacher: bool = True
    """DINO evaluates the teacher, which is better than the student (Caron et al., 2021)."""
    out_dim: int = 65536
    """Number of prototypes K of the head (65536 for ImageNet; a few thousand for CIFAR)."""
    hidden_dim: int = 2048
    """Hidden width of the head's MLP."""
    bottleneck_dim: int = 256
    """Dimension before the weight-normalised last layer."""
    head_layers: int = 3
    """Linear layers of the head's MLP, bottleneck included."""
    use_bn_in_head: bool = False
    """Batch norm in the head's MLP (the authors use it with ResNets only)."""
    norm_last_layer: bool = True
    """Fix the last layer's weight norm to 1 (more stable; False can train better ViT-S)."""
    student_temp: float = 0.1
    """Softmax temperature of the student."""
    teacher_temp: float = 0.04
    """Softmax temperature of the teacher after the warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0."""
    warmup_teacher_temp_epochs: float = 0.0
    """Epochs of linear teacher-temperature warm-up (30 in the ViT-S recipes)."""
    center_momentum: float = 0.9
    """EMA rate of the center of the teacher outputs."""
    centering: str = "center"
    """``"center"`` (DINO: subtract an EMA of the batch mean) or ``"sinkhorn_knopp"``
    (DINOv2: targets balanced over the prototypes; stable from the first step, which short
    runs and small batches need)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp normalisation rounds (DINOv2 uses 3)."""
    momentum: float = 0.996
    """Teacher momentum at step 0; it rises to 1 by a cosine."""
    freeze_last_layer: float = 1.0
    """Epochs during which the head's last layer gets no gradient."""

    def __post_init__(self) -> None:
        dims = (self.out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers)
        if min(dims) < 1:
            raise ConfigError(
                "method.out_dim, hidden_dim, bottleneck_dim, head_layers must be >= 1"
            )
        if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) <= 0:
            raise ConfigError("method temperatures must be > 0")
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer < 0:
            raise ConfigError(
                "method.warmup_teacher_temp_epochs and freeze_last_layer must be >= 0"
            )
        if self.centering not in ("center", "sinkhorn_knopp"):
            raise ConfigError(
                f"method.centering must be 'center' or 'sinkhorn_knopp', got {self.centering!r}"
            )
        if self.sinkhorn_iterations < 1:
            raise ConfigError("method.sinkhorn_iterations must be >= 1")
        if not 0.0 <= self.center_momentum <= 1.0 or not 0.0 <= self.momentum <= 1.0:
            raise ConfigError("method.center_momentum and momentum must be in [0, 1]")


def teacher_temperature(cfg: DINOConfig, epoch: float) -> float:
    """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
    if epoch >= cfg.warmup_teacher_temp_epochs:
        return cfg.teacher_temp
    frac = epoch / cfg.warmup_teacher_temp_epochs
    return cfg.warmup_teacher_temp + frac * (cfg.teacher_temp - cfg.warmup_teacher_temp)


class DINO(Method):
    def __init__(self, cfg: DINOConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = DINOHead(
            embed_dim(backbone),
            cfg.out_dim,
            hidden_dim=cfg.hidden_dim,
            bottleneck_dim=cfg.bottleneck_dim,
            num_layers=cfg.head_layers,
            use_bn=cfg.use_bn_in_head,
            norm_last_layer=cfg.norm_last_layer,
        )
        maybe_sync_batchnorm(self)  # before the copy: the teacher syncs its norms too
        # Plain attributes, so not registered (not cast to bf16, not partitioned): see models.ema.
        self.teacher = EMATeacher({"backbone": self.backbone, "head": self.head})
        self.center = torch.zeros(1, cfg.out_dim)  # float32, (1, K)
        self.teacher_temp = teacher_temperature(cfg, 0.0)
        self.head.last_layer_frozen = cfg.freeze_last_layer > 0

    def teacher_to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Move the teacher to ``device``. Its weights stay float32 whatever ``dtype`` (the run's
        compute dtype): it computes in the inputs' dtype under autocast (see models.ema)."""
        self.teacher.to(device)
        self.center = self.center.to(device)

    def before_step(self, ctx: StepContext) -> None:
        self.teacher_temp = teacher_temperature(self.cfg, ctx.epoch)
        self.head.last_layer_frozen = ctx.epoch < self.cfg.freeze_last_layer

    def forward(self, batch: Batch) -> dict[str, Any]:
        views = batch["views"]
        if len(views) < 2:
            raise ValueError(f"DINO needs 2 global crops (+ local crops), got {len(views)} views")
        globals_, locals_ = views[:2], views[2:]
        if globals_[0].shape != globals_[1].shape:
            raise ValueError("DINO's two global crops must have the same size")
        if len({v.shape for v in locals_}) > 1:
            raise ValueError("DINO's local crops must all have the same size")
        b = globals_[0].shape[0]
        self.teacher.follow(globals_[0], self.training)

        g = torch.cat(globals_)  # (2B, 3, H, W)
        feats = [embed(self.backbone, g)]  # (2B, D)
        if locals_:
            feats.append(embed(self.backbone, torch.cat(locals_)))  # ViT: dynamic size  # (nB, D)
        student = self.head(torch.cat(feats))  # ((2 + n) B, K)

        with torch.no_grad(), self.teacher.autocast(g):
            teacher = self.teacher["head"](embed(self.teacher["backbone"], g))
        teacher = teacher.float()  # (2B, K)
        if self.center.device != teacher.device:
            self.center = self.center.to(teacher.device)
        probs = self._teacher_probs(teacher)  # (2B, K)
        loss = dino_loss(
            list(student.chunk(len(views))), list(probs.chunk(2)), self.cfg.student_temp
        )
        if self.training and self.cfg.centering == "center":
            self._update_center(teacher)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return {
            "loss": loss,
            "teacher_entropy": entropy.detach(),
            "embeddings": (feats[0][:b].detach(), feats[0][b:].detach()),
        }

    @torch.no_grad()
    def _teacher_probs(self, teacher: torch.Tensor) -> torch.Tensor:
        """Centred and sharpened teacher distribution, ``(2B, K)`` rows summing to 1."""
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher, self.teacher_temp, self.cfg.sinkhorn_iterations)
        return F.softmax((teacher - self.center) / self.teacher_temp, dim=-1)

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        batch_center = all_reduce_mean_(teacher.mean(dim=0, keepdim=True))  # (1, K)
        m = self.cfg.center_momentum
        self.center = self.center * m + batch_center * (1 - m)

    def after_step(self, ctx: StepContext) -> None:
        m = cosine_momentum(self.cfg.momentum, ctx.progress)
        self.teacher.update({"backbone": self.backbone, "head": self.head}, m)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = self.teacher.state_dict()
        state["center"] = self.center.detach().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict(state)
        self.center = state["center"].to(device=self.center.device, dtype=torch.float32).clone()


@register_method("dino", DINOConfig)
def build_dino(method_cfg: DINOConfig, model_cfg: Any) -> DINO:
    return DINO(method_cfg, create_backbone(model_cfg))
