"""Quantization-aware fine-tuning of an exported encoder or student (see train.edge.qat)."""

from __future__ import annotations

from typing import Any

from models.registry import register_method
from train.edge.qat import QATConfig, QATMethod


@register_method("qat", QATConfig)
def build_qat(method_cfg: QATConfig, model_cfg: Any) -> QATMethod:
    return QATMethod(method_cfg, model_cfg)
