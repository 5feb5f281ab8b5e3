"""Learning-rate schedule, momentum schedule and weight-decay grouping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vitssl.models.registry import create_method
from vitssl.train.config import load_config
from vitssl.train.schedules import warmup_cosine


def test_warmup_then_cosine() -> None:
    peak, total, warm = 1.0, 110, 10
    lrs = [warmup_cosine(s, total, peak, warm, floor=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    # halfway through the cosine: floor + (peak - floor) / 2
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert warmup_cosine(total, total, peak, warm, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_tokens() -> None:
    cfg = load_config("mae_vit_tiny_demo", [])
    method = create_method(cfg.method, cfg.model)
    groups = method.param_groups(0.05)
    names = {id(p): n for n, p in method.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"backbone.cls_token", "mask_token"} <= no_decay
    assert "backbone.pos_embed" not in decay | no_decay  # frozen sin-cos: not trained at all
    assert all(n.endswith(".weight") for n in decay)
    assert not any("norm" in n for n in decay)
    assert "backbone.blocks.0.attn.qkv.weight" in decay
    assert "backbone.blocks.0.attn.qkv.bias" in no_decay
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    # and AdamW with these groups leaves no-decay params alone when their grads are zero
    opt = torch.optim.AdamW(groups, lr=1.0)
    for p in method.parameters():
        p.grad = torch.zeros_like(p)
    before = method.mask_token.detach().clone()
    w_before = method.decoder_embed.weight.detach().clone()
    opt.step()
    assert torch.equal(method.mask_token, before)
    torch.testing.assert_close(method.decoder_embed.weight, w_before * (1 - 0.05))
