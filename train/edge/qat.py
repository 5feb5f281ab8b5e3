"""Quantization-aware fine-tuning with the INT8 scheme of the ORT export, in place.

Every ``nn.Conv2d`` / ``nn.Linear`` is switched (class swap, same parameter names, so the
state dict still loads into timm) to a fake-quant twin: weights per-output-channel
symmetric int8 (scale = max |w| / 127), inputs per-tensor symmetric int8 with a running
max |x| (a non-persistent buffer). Gradients pass straight through the rounding (STE).
After the fine-tune :func:`strip` switches the classes back; the float weights, now
robust to rounding, are exported and quantized again by ONNX Runtime.

Two ways to run it:

* :func:`qat_finetune`, a short loop over in-memory images used by ``vitssl.train.edge_export`` when
  post-training quantization loses more than the accepted drop (seconds on a CPU; the
  images are the calibration / bank images already decoded);
* ``vitssl.models.methods.qat``, the same loss as a method of the project's trainer
  (``method.name = "qat"``, DeepSpeed, shards, checkpoints): it distils the FP32 encoder of
  ``method.init`` into its fake-quant copy (1 - cosine of the embeddings).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitssl.models.fake_quant import distill_loss, prepare, strip


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
    # QAT trains every weight, whatever the loader did: encoders loaded from a checkpoint
    # come back frozen (requires_grad=False), which left the optimizer an empty list.
    student.requires_grad_(True)
    student.train()
    for m in student.modules():  # frozen normalisation statistics, no dropout
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
            m.eval()
    opt = torch.optim.AdamW(list(student.parameters()), lr=lr, weight_decay=0.0)
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
