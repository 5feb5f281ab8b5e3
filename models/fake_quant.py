"""Fake quantization with the INT8 scheme of the ONNX Runtime export, by class swap.

Every ``nn.Conv2d`` / ``nn.Linear`` is switched (same parameter names, so the state dict
still loads into timm) to a fake-quant twin: weights per-output-channel symmetric int8
(scale = max |w| / 127), inputs per-tensor symmetric int8 with a running max |x| (a
non-persistent buffer). Gradients pass straight through the rounding (STE). :func:`strip`
switches the classes back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
