"""Speed switches applied to a built method: attention kernel, compiled blocks, fused
LayerNorm.

Each is chosen by the config. timm's attention modules take a per-module ``fused_attn``
switch: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs) or
its matmul + softmax form, which trains faster on CPUs (:func:`set_fused_attention`). The
fused AdamW is chosen in ``vitssl.train.optim``; selective activation checkpointing lives in
models.vit.
"""

from __future__ import annotations

import warnings

from timm.models.vision_transformer import Block
from torch import nn

try:  # NVIDIA apex is optional: it is not on the package index
    from apex.normalization import FusedLayerNorm  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    FusedLayerNorm = None


def _is_block(module: nn.Module) -> bool:
    """Transformer blocks, and the residual blocks of timm's ResNets."""
    return isinstance(module, Block) or type(module).__name__ in ("BasicBlock", "Bottleneck")


def set_fused_attention(model: nn.Module, fused: bool) -> int:
    """Point every timm attention module at SDPA (``fused``) or matmul + softmax; returns the
    count. The weights and the maths are the same; only the kernels differ."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            setattr(module, "fused_attn", fused)  # noqa: B010  (nn.Module typing)
            count += 1
    return count


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every block in place (state-dict keys unchanged); returns the count."""
    blocks = [m for m in model.modules() if _is_block(m)]
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)


def fuse_layernorms(model: nn.Module) -> int:
    """Swap ``nn.LayerNorm`` for apex's FusedLayerNorm (same parameters); 0 without apex."""
    if FusedLayerNorm is None:
        warnings.warn(
            "model.fused_layernorm is set but apex is not installed: ignored", stacklevel=2
        )
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps)
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
                count += 1
    return count
