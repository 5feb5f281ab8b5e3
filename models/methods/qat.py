"""Quantization-aware fine-tuning as a method of the trainer (see train.edge.qat)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vitssl.models.backbones import embed
from vitssl.models.ema import FrozenModules
from vitssl.models.fake_quant import distill_loss, prepare
from vitssl.models.methods.base import Method
from vitssl.models.pretrained import PretrainedWeights
from vitssl.models.registry import MethodConfig, register_method


@dataclass
class QATConfig(MethodConfig):
    """Quantization-aware fine-tuning of an encoder by self-distillation from its FP32 copy."""

    name: str = "qat"
    init: str = ""
    """The encoder to fine-tune: run dir, checkpoint, or encoder.safetensors (required)."""
    weight_fields: ClassVar[dict[str, bool]] = {"init": False}
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

    def __init__(self, cfg: QATConfig, encoder: nn.Module):
        """``encoder``: the float encoder to fine-tune (``method.init``, resolved by the
        entry point); the fake-quant student is a copy of it."""
        super().__init__()
        self.backbone = prepare(copy.deepcopy(encoder))
        # The FP32 reference is held outside the registered modules (models.ema): absent from
        # parameters(), state_dict(), DeepSpeed's dtype cast and ZeRO-3 partitioning.
        self.reference = FrozenModules({"teacher": encoder})
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
def build_qat(
    method_cfg: QATConfig, model_cfg: Any, weights: Mapping[str, PretrainedWeights]
) -> QATMethod:
    if "init" not in weights:
        raise ValueError("method.init is required: the encoder to fine-tune")
    return QATMethod(method_cfg, weights["init"].build())
