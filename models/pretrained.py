"""Pretrained backbone weights as plain values, handed to methods by the entry points.

Methods never read files: ``vitssl.train.weights`` resolves what a user names (run directory,
checkpoint, export, state-dict file) into :class:`PretrainedWeights`, and
``vitssl.models.registry.create_method`` passes them to the methods that declare weight fields
(``method.init``, ``method.teacher``).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitssl.models.backbones import create_backbone


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Strict load; a mismatch is one line naming the source and the architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ValueError(
            f"checkpoint {source} does not match the architecture {name}: {detail}"
        ) from None


@dataclass
class PretrainedWeights:
    """A backbone's fp32 state dict (timm names) and the architecture it belongs to."""

    state: dict[str, torch.Tensor]
    arch: Any
    """The model config the weights fit (name, img_size, patch_size, cifar_stem)."""
    source: str
    """The resolved file or checkpoint directory, for messages and results."""
    kind: str = "checkpoint"
    """checkpoint, export or state_dict."""
    head: dict[str, torch.Tensor] | None = None
    """``weight`` and ``bias`` of a fine-tuned checkpoint's classification head."""
    head_pool: str = "cls"
    """The pooling that head was trained on (``method.global_pool`` of the fine-tuning run)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Step, method and other metadata of the checkpoint."""

    def build(self) -> nn.Module:
        """The backbone with these weights (float32, training mode, requires_grad as built)."""
        with torch.device("meta"):  # no random init of weights that are overwritten at once
            model = create_backbone(self.arch)
        with contextlib.suppress(RuntimeError):  # reported by load_strict, on a real model
            model.load_state_dict(self.state, strict=True, assign=True)
        if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            with torch.random.fork_rng(devices=[]):
                model = create_backbone(self.arch)  # a buffer outside the state dict
            load_strict(model, self.state, self.source, self.arch.name)
        return model.float()

    def load_into(self, model: nn.Module) -> None:
        load_strict(model, self.state, self.source, self.arch.name)
