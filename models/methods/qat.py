"""Quantization-aware fine-tuning as a method of the trainer (see train.edge.qat)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.ema import FrozenModules
from models.fake_quant import distill_loss, prepare
from models.methods.base import Method
from models.registry import MethodConfig, register_method


@dataclass
class QATConfig(MethodConfig):
    """Quantization-aware fine-tuning of an encoder by self-distillation from its FP32 copy."""

    name: str = "qat"
    init: str = ""
    """The encoder to fine-tune: run dir, checkpoint, or encoder.safetensors (required)."""
    pool: str = "cls"
    """ViT feature that is distilled: cls or avg."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in ("cls", "avg"):
            raise ValueError(f"method.pool must be cls or avg, got {self.pool!r}")


class QATMethod(Method):
    """``loss = 1 - cos(fake_quant_student(x), fp32_teacher(x))`` on the first view.

    The backbone keeps timm's parameter names (class swap), so the trainer's
    ``encoder.safetensors`` export loads into the plain float architecture.
    """

    def __init__(self, cfg: QATConfig, model_cfg: Any):
        super().__init__()
        from models.backbones import embed
        from train.evaluation.encoders import load_encoder

        if not cfg.init:
            raise ValueError("method.init is required: the encoder to fine-tune")
        enc = load_encoder(cfg.init, img_size=model_cfg.img_size, patch_size=model_cfg.patch_size)
        self.backbone = prepare(copy.deepcopy(enc.model))
        # The FP32 reference is held outside the registered modules (models.ema): absent from
        # parameters(), state_dict(), DeepSpeed's dtype cast and ZeRO-3 partitioning.
        self.reference = FrozenModules({"teacher": enc.model})
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        self.pool = cfg.pool
        self._embed = embed

    @property
    def teacher(self) -> nn.Module:
        """The frozen float32 encoder the fake-quantised backbone is distilled from."""
        return self.reference["teacher"]

    def teacher_to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        self.reference.to(device)

    def train(self, mode: bool = True) -> QATMethod:
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
                m.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["views"][0]
        self.reference.follow(x)
        with torch.no_grad(), self.reference.autocast(x):
            t = self._embed(self.teacher, x, self.pool).float()  # (B, D)
        s = self._embed(self.backbone, x, self.pool)  # (B, D)
        loss = distill_loss(s, t, "embedding")
        return {"loss": loss, "cosine": 1.0 - loss.detach()}


@register_method("qat", QATConfig)
def build_qat(method_cfg: QATConfig, model_cfg: Any) -> QATMethod:
    return QATMethod(method_cfg, model_cfg)
