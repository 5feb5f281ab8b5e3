"""Quantization-aware fine-tuning with the INT8 scheme of the ORT export, in place.

Every ``nn.Conv2d`` / ``nn.Linear`` is switched (class swap, same parameter names, so the
state dict still loads into timm) to a fake-quant twin: weights per-output-channel
symmetric int8 (scale = max |w| / 127), inputs per-tensor symmetric int8 with a running
max |x| (a non-persistent buffer). Gradients pass straight through the rounding (STE).
After the fine-tune :func:`strip` switches the classes back; the float weights, now
robust to rounding, are exported and quantized again by ONNX Runtime.

Two ways to run it:

* :func:`qat_finetune`, a short loop over in-memory images used by ``train.export`` when
  post-training quantization loses more than the accepted drop (seconds on a CPU; the
  images are the calibration / bank images already decoded);
* :class:`QATMethod`, the same loss as a method of the project's trainer (``method.name =
  "qat"``, DeepSpeed, shards, checkpoints): it distils the FP32 encoder of ``method.init``
  into its fake-quant copy (1 - cosine of the embeddings). Register it in
  ``models/methods`` (see the lead's note in the final report).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.methods.base import Method
from train.config import ConfigError, MethodConfig

QMAX = 127


def _act_scale(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Scale of the input's symmetric int8 grid; the running max updates in training."""
    buf: torch.Tensor = module.act_absmax  # type: ignore[assignment]
    if module.training:
        cur = x.detach().abs().amax().float()
        with torch.no_grad():
            if float(buf) == 0.0:
                buf.copy_(cur)
            else:
                buf.mul_(0.9).add_(0.1 * cur)
    return (buf.clamp_min(1e-8) / QMAX).to(x.dtype)


def fake_quant_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    scale = _act_scale(module, x)
    return torch.fake_quantize_per_tensor_affine(x, scale, torch.tensor(0), -QMAX - 1, QMAX)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (axis 0)."""
    scale = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-8) / QMAX  # (C_out,)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -QMAX, QMAX)


class FakeQuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            fake_quant_input(self, x), fake_quant_weight(self.weight), self.bias
        )


class FakeQuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_input(self, x), fake_quant_weight(self.weight), self.bias)


_SWAP: dict[type, type] = {nn.Conv2d: FakeQuantConv2d, nn.Linear: FakeQuantLinear}
_BACK: dict[type, type] = {v: k for k, v in _SWAP.items()}


def prepare(model: nn.Module) -> nn.Module:
    """Switch every Conv2d / Linear of ``model`` to its fake-quant twin, in place."""
    for m in model.modules():
        if type(m) in _SWAP:
            m.__class__ = _SWAP[type(m)]
            m.register_buffer("act_absmax", torch.zeros(()), persistent=False)
    return model


def strip(model: nn.Module) -> nn.Module:
    """Back to plain float modules, in place (weights kept)."""
    for m in model.modules():
        if type(m) in _BACK:
            m.__class__ = _BACK[type(m)]
            del m._buffers["act_absmax"]
    return model


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """KL of softened logits (head) or 1 - cosine of embeddings."""
    if kind == "logits":
        return F.kl_div(
            F.log_softmax(student, dim=1),
            F.log_softmax(teacher, dim=1),
            reduction="batchmean",
            log_target=True,
        )
    return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()


def qat_finetune(
    model: nn.Module,
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    kind: str = "embedding",
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 32,
    distill_weight: float = 1.0,
    seed: int = 0,
) -> tuple[nn.Module, list[float]]:
    """A fake-quant fine-tuned float copy of ``model`` and its per-step losses.

    The FP32 ``model`` itself is the distillation teacher; with ``labels`` and a head, a
    cross-entropy term is added. Norm layers stay in eval mode (running statistics frozen).
    """
    if steps < 1 or len(images) == 0:
        raise ValueError("qat needs steps >= 1 and at least one image")
    teacher = model.eval()
    student = prepare(copy.deepcopy(model))
    student.train()
    for m in student.modules():  # frozen normalisation statistics, no dropout
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
            m.eval()
    opt = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    g = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    targets = torch.from_numpy(labels).long() if labels is not None else None
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=g)
        x = data[idx]
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = distill_weight * distill_loss(s, t, kind)
        if targets is not None and kind == "logits":
            loss = loss + F.cross_entropy(s, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return strip(student), losses


# ---------------------------------------------------------------- the trainer's method


@dataclass
class QATConfig(MethodConfig):
    """Quantization-aware fine-tuning of an encoder by self-distillation from its FP32 copy."""

    name: str = "qat"
    init: str = ""
    """The encoder to fine-tune: run dir, checkpoint, or encoder.safetensors (required)."""
    pool: str = "cls"
    """ViT feature that is distilled: cls or avg."""

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "avg"):
            raise ConfigError(f"method.pool must be cls or avg, got {self.pool!r}")


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
            raise ConfigError("method.init is required: the encoder to fine-tune")
        enc = load_encoder(cfg.init, img_size=model_cfg.img_size, patch_size=model_cfg.patch_size)
        self.teacher = enc.model.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.backbone = prepare(copy.deepcopy(enc.model))
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        self.pool = cfg.pool
        self._embed = embed

    def train(self, mode: bool = True) -> QATMethod:
        super().train(mode)
        self.teacher.eval()
        for m in self.backbone.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
                m.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["views"][0]
        with torch.no_grad():
            t = self._embed(self.teacher, x, self.pool)  # (B, D)
        s = self._embed(self.backbone, x, self.pool)  # (B, D)
        loss = distill_loss(s, t, "embedding")
        return {"loss": loss, "cosine": 1.0 - loss.detach()}
