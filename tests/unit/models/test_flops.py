"""The analytic FLOP count agrees with PyTorch's FlopCounterMode on the real modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitssl.models.flops import mae_forward_flops
from vitssl.models.methods.mae import MAE, MAEConfig
from vitssl.models.vit import create_vit


def _explicit_attention(model: torch.nn.Module) -> None:
    """FlopCounterMode misses the CPU flash-attention kernel; count the explicit matmuls."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


def _measured(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_mae_flops_match_flop_counter() -> None:
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=4)
    cfg = MAEConfig(decoder_dim=64, decoder_depth=2, decoder_heads=4)
    mae = MAE(cfg, vit).eval()
    _explicit_attention(mae)
    imgs = torch.randn(2, 3, 32, 32)
    measured = _measured(lambda: mae.forward_with_noise(imgs, torch.rand(2, 64)))
    expected = 2 * mae_forward_flops(32, 4, 192, 12, 64, 2, 0.75)
    assert measured == pytest.approx(expected, rel=1e-3)
