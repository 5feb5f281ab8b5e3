"""MoCo v3 (Chen, Xie & He 2021): query encoder with predictor, momentum key encoder.

* Base branch: backbone -> projector -> predictor; momentum branch: an EMA copy of
  backbone + projector (vitssl.models.methods.base.EMAMethod).
* Loss: symmetrised InfoNCE against the keys of every rank, times ``2 * temperature``.
* Momentum: cosine from ``momentum`` to 1 over training, a pure function of the step.
* ``freeze_patch_embed``: the ViT's patch projection stays at its random init
  (``requires_grad=False`` from the start), the paper's fix for training instability.
* ``queue_size > 0``: a MoCo v2-style memory of past keys adds negatives for small batches.
  The queue lives in a non-persistent buffer and is saved through ``extra_state()``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vitssl.models.backbones import create_backbone, embed, embed_dim, is_vit
from vitssl.models.distributed import gather_no_grad
from vitssl.models.heads import maybe_sync_batchnorm, projection_mlp
from vitssl.models.losses import info_nce_loss
from vitssl.models.methods.base import Batch, EMAMethod
from vitssl.models.registry import MethodConfig, register_method


@dataclass
class MoCoV3Config(MethodConfig):
    """MoCo v3's hyper-parameters (defaults: the paper's ViT settings)."""

    has_teacher: ClassVar[bool] = True

    name: str = "mocov3"
    """The method's registry name."""
    temperature: float = 0.2
    """InfoNCE temperature (0.2 for ViT, 1.0 for ResNet-50)."""
    proj_layers: int = 3
    """Projector depth (3 for ViT, 2 for ResNet)."""
    proj_hidden_dim: int = 4096
    """Hidden width of the projector and of the predictor."""
    proj_out_dim: int = 256
    """Output dimension of the projector and of the predictor."""
    pred_layers: int = 2
    """Predictor depth."""
    pred_last_bn: bool = True
    """Batch norm after the predictor's output layer (True for ViT, False for ResNet)."""
    momentum: float = 0.99
    """Momentum of the key encoder at step 0; it rises to 1 by a cosine."""
    freeze_patch_embed: bool = False
    """Keep the ViT patch projection at its random init (the paper's ViT recipes set it)."""
    queue_size: int = 0
    """Keys kept from past batches as extra negatives (MoCo v2's queue); 0 turns it off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError("method.temperature must be > 0")
        if min(self.proj_layers, self.pred_layers, self.proj_hidden_dim, self.proj_out_dim) < 1:
            raise ValueError("method projector/predictor layers and dims must be >= 1")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError("method.momentum must be in [0, 1]")
        if self.queue_size < 0:
            raise ValueError("method.queue_size must be >= 0")


class MoCoV3(EMAMethod):
    queue: torch.Tensor

    def __init__(self, cfg: MoCoV3Config, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d, h, p = embed_dim(backbone), cfg.proj_hidden_dim, cfg.proj_out_dim
        self.projector = projection_mlp(d, h, p, cfg.proj_layers, True, last_bn_affine=False)
        self.predictor = projection_mlp(
            p, h, p, cfg.pred_layers, cfg.pred_last_bn, last_bn_affine=False
        )
        self.register_buffer(
            "queue", F.normalize(torch.randn(cfg.queue_size, p), dim=1), persistent=False
        )
        self.queue_ptr = 0
        maybe_sync_batchnorm(self)  # before the copy: the key encoder syncs its norms too
        self.init_teacher(("backbone", "projector"), cfg.momentum)

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = embed(self.backbone, x)  # (B, D)
        return h, self.predictor(self.projector(h))  # (B, P)

    def forward(self, batch: Batch) -> dict[str, Any]:
        views = batch["views"]
        if len(views) != 2:
            raise ValueError(f"MoCo v3 needs 2 views per image, got {len(views)}")
        x1, x2 = views
        self.teacher.follow(x1, self.training)
        h1, q1 = self._query(x1)
        h2, q2 = self._query(x2)
        k1, k2 = self.teacher_output(x1, "projector"), self.teacher_output(x2, "projector")
        queue = None
        if self.cfg.queue_size:
            # A copy: the buffer is overwritten below, after the loss has used it.
            queue = self.queue.to(device=q1.device, dtype=torch.float32, copy=True)
        t = self.cfg.temperature
        loss = info_nce_loss(q1, k2, t, queue) + info_nce_loss(q2, k1, t, queue)
        if self.cfg.queue_size and self.training:
            self._enqueue(gather_no_grad(k1))
        return {"loss": loss, "embeddings": (h1.detach(), h2.detach())}

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys: (N, P)`` over the oldest entries (wrapping around)."""
        size = self.queue.shape[0]
        keys = F.normalize(keys[-size:], dim=1)
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue[index] = keys.to(device=self.queue.device, dtype=self.queue.dtype)
        self.queue_ptr = (self.queue_ptr + keys.shape[0]) % size

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = super().extra_state()
        state["queue"] = self.queue.detach().clone()
        state["queue_ptr"] = torch.tensor(self.queue_ptr)
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.queue.copy_(state["queue"])
        self.queue_ptr = int(state["queue_ptr"])


@register_method("mocov3", MoCoV3Config)
def build_mocov3(method_cfg: MoCoV3Config, model_cfg: Any) -> MoCoV3:
    backbone = create_backbone(model_cfg)
    if method_cfg.freeze_patch_embed:
        if is_vit(backbone):
            backbone.patch_embed.proj.requires_grad_(False)  # type: ignore[union-attr]
        else:
            warnings.warn(
                "method.freeze_patch_embed ignored: the backbone is not a ViT", stacklevel=2
            )
    return MoCoV3(method_cfg, backbone)
