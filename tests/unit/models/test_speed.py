"""Speed switches change kernels, never the maths: the attention kernel switch against SDPA."""

from __future__ import annotations

import pytest
import torch

from vitssl.models.registry import create_method
from vitssl.models.speed import set_fused_attention
from vitssl.train.config import ConfigError, load_config
from vitssl.train.engine import apply_speed_switches


def _mae():
    cfg = load_config(
        "mae_vit_tiny_demo",
        ["model.patch_size=8", "method.decoder_depth=2", "method.decoder_dim=64"],
    )
    torch.manual_seed(0)
    return cfg, create_method(cfg.method, cfg.model)


def _flags(method: torch.nn.Module) -> list[bool]:
    return [
        m.fused_attn for m in method.modules() if isinstance(getattr(m, "fused_attn", None), bool)
    ]


def test_math_attention_equals_sdpa_in_loss_and_every_gradient() -> None:
    _, method = _mae()
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 16)
    results = []
    for fused in (True, False):
        assert set_fused_attention(method, fused) == 12 + 2  # encoder + decoder blocks
        method.zero_grad(set_to_none=True)
        loss, _, _ = method.forward_with_noise(imgs, noise)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_f, grads_f), (loss_m, grads_m) = results
    torch.testing.assert_close(loss_m, loss_f, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_m.keys() and len(grads_f) > 50
    for name in grads_f:
        torch.testing.assert_close(grads_m[name], grads_f[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("attention", "device", "fused"),
    [
        ("auto", "cpu", False),
        ("auto", "cuda", True),
        ("fused", "cpu", True),
        ("math", "cuda", False),
    ],
)
def test_auto_picks_math_on_cpus_and_sdpa_on_gpus(attention: str, device: str, fused: bool) -> None:
    cfg, method = _mae()
    cfg.model.attention = attention
    apply_speed_switches(method, cfg, torch.device(device))  # sets flags only: nothing moves
    assert set(_flags(method)) == {fused}


def test_an_unknown_attention_kernel_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.attention='flash'"):
        load_config("mae_vit_tiny_demo", ["model.attention=flash"])
