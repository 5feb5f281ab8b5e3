"""DINO as published: per-epoch teacher temperature, cosine weight decay, per-parameter
clipping — each against the official code's formula (facebookresearch/dino, main_dino.py
``DINOLoss.__init__`` and utils.py ``cosine_scheduler`` / ``clip_gradients``), written out
here with numpy / plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitssl.models.methods.base import StepContext
from vitssl.models.methods.dino import DINOConfig, teacher_temperature
from vitssl.train.config import ConfigError, load_config
from vitssl.train.optim import build_optimizer, clip_per_parameter_
from vitssl.train.run_plan import set_weight_decay, weight_decay_at


@pytest.mark.parametrize("warmup", [1, 2, 30])
def test_teacher_temperature_is_dinos_per_epoch_linspace(warmup: int) -> None:
    nepochs = 100
    official = np.concatenate(
        (np.linspace(0.04, 0.07, warmup), np.ones(nepochs - warmup) * 0.07)
    )  # DINOLoss.teacher_temp_schedule, indexed by epoch
    cfg = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=warmup)
    for epoch in range(nepochs):
        assert teacher_temperature(cfg, epoch) == pytest.approx(float(official[epoch]), abs=1e-12)


def test_dino_method_holds_the_temperature_within_an_epoch() -> None:
    from vitssl.models.registry import create_method
    from vitssl.train.config import ModelSection

    cfg = DINOConfig(
        out_dim=16,
        hidden_dim=16,
        bottleneck_dim=8,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=4,
    )
    method = create_method(
        cfg, ModelSection(name="vit_tiny_patch16_224", img_size=32, patch_size=8)
    )
    official = np.linspace(0.04, 0.07, 4)
    for step in range(0, 50):
        method.before_step(StepContext(step, 50, steps_per_epoch=10))
        assert method.teacher_temp == pytest.approx(float(official[min(step // 10, 3)]))


def _official_cosine_scheduler(base: float, final: float, epochs: int, niter: int) -> np.ndarray:
    """utils.cosine_scheduler with warmup_epochs=0 (how main_dino.py builds wd_schedule)."""
    iters = np.arange(epochs * niter)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_weight_decay_schedule_is_dinos_cosine() -> None:
    official = _official_cosine_scheduler(0.04, 0.4, 10, 7)
    total = len(official)
    ours = [weight_decay_at("cosine", 0.04, 0.4, s, total) for s in range(total)]
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-12)
    assert weight_decay_at("constant", 0.05, 0.4, 3, total) == 0.05


def test_scheduled_decay_only_touches_decaying_groups() -> None:
    cfg = load_config(
        "dino_vit_tiny_cifar", ["optim.wd_schedule=cosine", "optim.weight_decay_end=0.4"]
    )
    groups = [{"params": [], "weight_decay": 0.04}, {"params": [], "weight_decay": 0.0}]
    official = _official_cosine_scheduler(0.04, 0.4, 1, 100)
    for step in (0, 37, 99):
        set_weight_decay(groups, cfg.optim, step, 100)
        assert groups[0]["weight_decay"] == pytest.approx(float(official[step]))
        assert groups[1]["weight_decay"] == 0.0


def _official_clip_gradients(grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    out = []
    for g in grads:
        g = g.clone()
        param_norm = g.norm(2)
        clip_coef = clip / (param_norm + 1e-6)
        if clip_coef < 1:
            g.mul_(clip_coef)
        out.append(g)
    return out


def test_per_parameter_clipping_matches_dino_and_runs_in_the_optimizer() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(3)]
    scales = (0.01, 1.0, 50.0)  # below, around and far above the threshold
    grads = [torch.randn(5, 4) * s for s in scales]
    expected = _official_clip_gradients(grads, 3.0)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    clip_per_parameter_(params, 3.0)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
    assert params[2].grad is not None and params[2].grad.norm() < grads[2].norm() / 10

    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt = build_optimizer("adamw", [{"params": params}], 0.0, (0.9, 0.999), False, False, 3.0)
    opt.step()  # the pre-step hook clips before the update
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


def test_per_parameter_clipping_refused_where_partitions_hide_parameters() -> None:
    ok = ["optim.clip_mode=per_param", "train.zero=zero0", "train.precision=fp32"]
    assert load_config("dino_vit_tiny_cifar", ok).optim.clip_mode == "per_param"
    for zero, precision in (("zero1", "fp32"), ("zero2", "fp32"), ("zero0", "bf16")):
        bad = ["optim.clip_mode=per_param", f"train.zero={zero}", f"train.precision={precision}"]
        with pytest.raises(ConfigError, match=r"per_param needs train\.zero=zero0") as e:
            load_config("dino_vit_tiny_cifar", bad)
        assert "\n" not in str(e.value)
