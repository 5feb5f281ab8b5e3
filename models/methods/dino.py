"""DINO (Caron et al. 2021): self-distillation with no labels, multi-crop.

* Student: backbone + :class:`models.heads.DINOHead` on every crop; teacher: an EMA copy of
  both (vitssl.models.methods.base.EMAMethod) that sees the two global crops only.
* Teacher outputs are centred (``center``: EMA with ``center_momentum`` of the batch mean
  over all ranks) and sharpened (temperature warmed up per epoch from
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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vitssl.models.backbones import create_backbone, embed, embed_dim
from vitssl.models.distributed import all_reduce_mean_
from vitssl.models.heads import DINOHead, maybe_sync_batchnorm
from vitssl.models.losses import dino_loss, sinkhorn_knopp
from vitssl.models.methods.base import Batch, EMAMethod, StepContext
from vitssl.models.registry import MethodConfig, register_method


@dataclass
class DINOConfig(MethodConfig):
    """DINO's hyper-parameters (defaults: the authors' main_dino.py)."""

    has_teacher: ClassVar[bool] = True

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
    warmup_teacher_temp_epochs: int = 0
    """Epochs of teacher-temperature warm-up (30 in the authors' ViT recipes): epoch ``e``
    uses ``linspace(warmup_teacher_temp, teacher_temp, W)[e]`` (the final value at W - 1)."""
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
        super().__post_init__()
        dims = (self.out_dim, self.hidden_dim, self.bottleneck_dim, self.head_layers)
        if min(dims) < 1:
            raise ValueError("method.out_dim, hidden_dim, bottleneck_dim, head_layers must be >= 1")
        if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) <= 0:
            raise ValueError("method temperatures must be > 0")
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer < 0:
            raise ValueError("method.warmup_teacher_temp_epochs and freeze_last_layer must be >= 0")
        if self.centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(
                f"method.centering must be 'center' or 'sinkhorn_knopp', got {self.centering!r}"
            )
        if self.sinkhorn_iterations < 1:
            raise ValueError("method.sinkhorn_iterations must be >= 1")
        if not 0.0 <= self.center_momentum <= 1.0 or not 0.0 <= self.momentum <= 1.0:
            raise ValueError("method.center_momentum and momentum must be in [0, 1]")


def teacher_temperature(cfg: DINOConfig, epoch: int) -> float:
    """DINO's per-epoch schedule: ``np.linspace(warmup_teacher_temp, teacher_temp, W)``
    indexed by the integer epoch (reaching ``teacher_temp`` at epoch W - 1), then constant."""
    w = cfg.warmup_teacher_temp_epochs
    if epoch >= w:
        return cfg.teacher_temp
    if w == 1:
        return cfg.warmup_teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * epoch / (w - 1)


class DINO(EMAMethod):
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
        self.init_teacher(("backbone", "head"), cfg.momentum)
        # A plain attribute, like the teacher: not cast to bf16 (saved in extra_state).
        self.center = torch.zeros(1, cfg.out_dim)  # float32, (1, K)
        self.teacher_temp = teacher_temperature(cfg, 0)
        self.head.last_layer_frozen = cfg.freeze_last_layer > 0

    def teacher_to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        super().teacher_to(device, dtype)
        self.center = self.center.to(device)

    def before_step(self, ctx: StepContext) -> None:
        self.teacher_temp = teacher_temperature(self.cfg, ctx.step // max(1, ctx.steps_per_epoch))
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

        teacher = self.teacher_output(g, "head")  # (2B, K)
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

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = super().extra_state()
        state["center"] = self.center.detach().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.center = state["center"].to(device=self.center.device, dtype=torch.float32).clone()


@register_method("dino", DINOConfig)
def build_dino(method_cfg: DINOConfig, model_cfg: Any) -> DINO:
    return DINO(method_cfg, create_backbone(model_cfg))
