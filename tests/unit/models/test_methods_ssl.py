"""Forward/backward of every joint-embedding method on a tiny ViT and a tiny CIFAR ResNet,
plus the behaviour each method owns (teachers, schedules, queue, centre, frozen layer)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import timm
import torch

from vitssl.models.collapse import collapse_metrics
from vitssl.models.ema import cosine_momentum
from vitssl.models.methods.base import Method, StepContext
from vitssl.models.methods.byol import BYOLConfig, build_byol
from vitssl.models.methods.dino import DINOConfig, build_dino, teacher_temperature
from vitssl.models.methods.mocov3 import MoCoV3Config, build_mocov3
from vitssl.models.methods.simclr import SimCLRConfig, build_simclr
from vitssl.models.methods.simsiam import SimSiamConfig, build_simsiam
from vitssl.models.registry import create_method
from vitssl.train.config import ConfigError, ModelSection, config_from_dict

VIT = ModelSection(name="vit_tiny_patch16_224", img_size=32, patch_size=8)
RESNET = ModelSection(name="resnet18", img_size=8, patch_size=4, cifar_stem=True)
SMALL = {"proj_hidden_dim": 32, "proj_out_dim": 16}
CONFIGS: dict[str, Any] = {
    "simclr": SimCLRConfig(**SMALL),
    "mocov3": MoCoV3Config(**SMALL, queue_size=8),
    "byol": BYOLConfig(**SMALL),
    "simsiam": SimSiamConfig(proj_dim=16, pred_hidden_dim=8),
    "dino": DINOConfig(out_dim=32, hidden_dim=32, bottleneck_dim=8),
}
BUILDERS = {
    "simclr": build_simclr,
    "mocov3": build_mocov3,
    "byol": build_byol,
    "simsiam": build_simsiam,
    "dino": build_dino,
}
CTX = StepContext(step=0, total_steps=10, steps_per_epoch=5)


_timm_create_model = timm.create_model


def _two_block_vit(name: str, **kwargs: Any) -> torch.nn.Module:
    """timm.create_model, with ViTs cut to two blocks (timm's weight init of 12 is slow)."""
    if name.startswith("vit_"):
        kwargs["depth"] = 2
    return _timm_create_model(name, **kwargs)


@pytest.fixture(autouse=True)
def _small_vits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timm, "create_model", _two_block_vit)


def _views(name: str, size: int, b: int = 4, dtype: torch.dtype = torch.float32) -> list:
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(b, 3, size, size, generator=g, dtype=dtype) for _ in range(2)]
    if name == "dino":
        views += [torch.randn(b, 3, size // 2, size // 2, generator=g, dtype=dtype)] * 2
    return views


def _build(name: str, model_cfg: ModelSection, **overrides: Any) -> Method:
    torch.manual_seed(0)
    cfg = type(CONFIGS[name])(**{**vars(CONFIGS[name]), **overrides})
    return BUILDERS[name](cfg, model_cfg)


@pytest.mark.parametrize("model_cfg", [VIT, RESNET], ids=["vit", "resnet"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward(name: str, model_cfg: ModelSection) -> None:
    method = _build(name, model_cfg)
    method.before_step(CTX)
    out = method({"views": _views(name, model_cfg.img_size)})
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in method.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    z1, z2 = out["embeddings"]
    assert z1.shape == z2.shape == (4, method.backbone.num_features) and not z1.requires_grad
    assert set(collapse_metrics(z1, z2)) >= {"std_ratio", "rankme"}
    method.after_step(StepContext(step=1, total_steps=10, steps_per_epoch=5))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_forward_backward(name: str) -> None:
    method = _build(name, VIT).to(torch.bfloat16)  # what DeepSpeed's bf16 mode does
    out = method({"views": _views(name, 32, dtype=torch.bfloat16)})
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    method.after_step(CTX)
    if hasattr(method, "teacher"):
        assert next(method.teacher["backbone"].parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["mocov3", "byol", "dino"])
def test_teacher_outside_parameters_and_restored_from_extra_state(name: str) -> None:
    method = _build(name, VIT)
    teacher = method.teacher  # type: ignore[attr-defined]
    own = {id(p) for p in method.parameters()}
    assert not own & {id(p) for p in teacher.modules.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    method.train()
    method({"views": _views(name, 32)})["loss"].backward()
    method.after_step(StepContext(step=3, total_steps=10, steps_per_epoch=5))
    state = method.extra_state()  # type: ignore[attr-defined]
    assert any(k.startswith("teacher.backbone.") for k in state)

    fresh = _build(name, VIT)
    fresh.load_extra_state(state)  # type: ignore[attr-defined]
    again = fresh.extra_state()  # type: ignore[attr-defined]
    assert again.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(again[k], v)


@pytest.mark.parametrize("name", ["mocov3", "byol", "dino"])
def test_after_step_moves_teacher_by_cosine_momentum(name: str) -> None:
    method = _build(name, VIT)
    teacher = method.teacher  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    t0 = {k: v.clone() for k, v in teacher["backbone"].named_parameters()}
    ctx = StepContext(step=4, total_steps=10, steps_per_epoch=5)
    method.after_step(ctx)
    m = cosine_momentum(CONFIGS[name].momentum, 0.4)
    assert m == pytest.approx(1 - (1 - CONFIGS[name].momentum) * (1 + math.cos(0.4 * math.pi)) / 2)
    student = dict(method.backbone.named_parameters())
    for k, v in teacher["backbone"].named_parameters():
        torch.testing.assert_close(v, m * t0[k] + (1 - m) * student[k].detach())


def test_simclr_loss_is_nt_xent_of_its_projections() -> None:
    from vitssl.models.backbones import embed
    from vitssl.models.losses import nt_xent_loss

    method = _build("simclr", VIT)
    views = _views("simclr", 32)
    out = method({"views": views})
    z = method.projector(embed(method.backbone, torch.cat(views)))
    torch.testing.assert_close(out["loss"], nt_xent_loss(z[:4], z[4:], 0.1))


def test_byol_and_simsiam_losses_follow_the_formulas() -> None:
    import torch.nn.functional as F

    from vitssl.models.backbones import embed

    byol = _build("byol", VIT)
    x1, x2 = _views("byol", 32)
    out = byol({"views": [x1, x2]})
    with torch.no_grad():
        p = [byol.predictor(byol.projector(embed(byol.backbone, x))) for x in (x1, x2)]
        t = [byol.teacher["projector"](embed(byol.teacher["backbone"], x)) for x in (x1, x2)]
        expected = sum(
            (2 - 2 * F.cosine_similarity(p[i], t[1 - i], dim=1)).mean() for i in range(2)
        )
    torch.testing.assert_close(out["loss"].detach(), expected)

    siam = _build("simsiam", VIT)
    out = siam({"views": [x1, x2]})
    with torch.no_grad():
        z = [siam.projector(embed(siam.backbone, x)) for x in (x1, x2)]
        p = [siam.predictor(zi) for zi in z]
        expected = -sum(F.cosine_similarity(p[i], z[1 - i], dim=1).mean() for i in range(2)) / 2
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_mocov3_queue_takes_the_keys_of_the_first_view() -> None:
    import torch.nn.functional as F

    from vitssl.models.backbones import embed

    method = _build("mocov3", VIT)
    x1, x2 = _views("mocov3", 32)
    with torch.no_grad():
        k1 = method.teacher["projector"](embed(method.teacher["backbone"], x1))
    old_tail = method.queue[4:].clone()
    method({"views": [x1, x2]})
    torch.testing.assert_close(method.queue[:4], F.normalize(k1, dim=1))
    torch.testing.assert_close(method.queue[4:], old_tail)
    assert method.queue_ptr == 4
    method({"views": [x1, x2]})
    method({"views": [x1, x2]})  # wraps around
    assert method.queue_ptr == 4
    assert method.extra_state()["queue_ptr"].item() == 4


def test_mocov3_frozen_patch_embed_gets_no_gradient() -> None:
    method = _build("mocov3", VIT, freeze_patch_embed=True)
    proj = method.backbone.patch_embed.proj
    assert not proj.weight.requires_grad
    method({"views": _views("mocov3", 32)})["loss"].backward()
    assert proj.weight.grad is None
    assert method.backbone.blocks[0].attn.qkv.weight.grad is not None
    with pytest.warns(UserWarning, match="not a ViT"):
        _build("mocov3", RESNET, freeze_patch_embed=True)


def test_dino_last_layer_frozen_in_first_epoch_then_trained() -> None:
    method = _build("dino", VIT)
    views = _views("dino", 32)
    method.before_step(StepContext(step=4, total_steps=10, steps_per_epoch=5))  # epoch 0.8
    method({"views": views})["loss"].backward()
    assert method.head.weight_v.grad is None
    assert method.head.mlp[0].weight.grad is not None
    method.zero_grad()
    method.before_step(StepContext(step=5, total_steps=10, steps_per_epoch=5))  # epoch 1
    method({"views": views})["loss"].backward()
    assert method.head.weight_v.grad is not None and method.head.weight_v.grad.abs().sum() > 0


def test_dino_center_and_teacher_temperature() -> None:
    from vitssl.models.backbones import embed

    cfg = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    assert teacher_temperature(cfg, 0) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 1) == pytest.approx(0.055)  # linspace(.04, .07, 3)[1]
    assert teacher_temperature(cfg, 5) == pytest.approx(0.07)

    method = _build("dino", VIT)
    views = _views("dino", 32)
    with torch.no_grad():
        t = method.teacher["head"](embed(method.teacher["backbone"], torch.cat(views[:2])))
    out = method({"views": views})
    torch.testing.assert_close(method.center, 0.1 * t.mean(dim=0, keepdim=True))
    probs = torch.softmax(t / 0.04, dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(out["teacher_entropy"], entropy, rtol=1e-4, atol=1e-5)


def test_dino_sinkhorn_centering_gives_balanced_teacher_targets() -> None:
    from vitssl.models.backbones import embed
    from vitssl.models.losses import dino_loss, sinkhorn_knopp

    method = _build("dino", VIT, centering="sinkhorn_knopp", teacher_temp=0.05)
    method.teacher_temp = 0.05
    views = _views("dino", 32)
    with torch.no_grad():
        t = method.teacher["head"](embed(method.teacher["backbone"], torch.cat(views[:2])))
        crops = [embed(method.backbone, v) for v in views[:2]]
        crops += [embed(method.backbone, v) for v in views[2:]]
        logits = [method.head(c) for c in crops]
    out = method({"views": views})
    # The loss is DINO's cross-entropy against the Sinkhorn-Knopp targets of the teacher's
    # logits, not against a softmax around the EMA center.
    q = sinkhorn_knopp(t, 0.05, iterations=3)
    torch.testing.assert_close(out["loss"].detach(), dino_loss(logits, list(q.chunk(2)), 0.1))
    entropy = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
    torch.testing.assert_close(out["teacher_entropy"], entropy, rtol=1e-4, atol=1e-5)
    softmax = torch.softmax(t / 0.05, dim=-1)  # what the zero initial center would give
    assert not torch.allclose(q, softmax, atol=1e-3)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_predictor_gets_its_own_learning_rate_scale(name: str) -> None:
    method = _build(name, VIT, predictor_lr_scale=10.0)
    groups = method.param_groups(0.05)
    predictor = {id(p) for p in method.predictor.parameters()}
    seen: set[int] = set()
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= predictor or not ids & predictor  # no group mixes the two
        assert g["lr_scale"] == (10.0 if ids <= predictor else 1.0)
        assert g["weight_decay"] in (0.0, 0.05)
        seen |= ids
    assert seen == {id(p) for p in method.parameters() if p.requires_grad}
    assert [g["lr_scale"] for g in groups][:2] == [1.0, 1.0]  # the default groups lead
    plain = _build(name, VIT).param_groups(0.05)
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0]


def _embed_resampled(vit: Any, imgs: torch.Tensor) -> torch.Tensor:
    """A ViT's class token for crops of another size, written out: the position table
    (class token first) resampled to the crop's patch grid with timm's function."""
    from timm.layers import resample_abs_pos_embed

    x = vit.patch_embed.proj(imgs)  # (B, D, h, w)
    grid = [x.shape[-2], x.shape[-1]]
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
    pos = resample_abs_pos_embed(vit.pos_embed, new_size=grid, num_prefix_tokens=1)
    cls = (vit.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    x = vit.blocks(torch.cat([cls, x + pos[:, 1:]], dim=1))
    return vit.norm(x)[:, 0]


def test_dino_embeds_local_crops_of_another_size() -> None:
    from vitssl.models.backbones import embed

    method = _build("dino", VIT).eval()
    small = torch.randn(2, 3, 16, 16)
    out = embed(method.backbone, small)
    assert out.shape == (2, method.backbone.num_features)
    torch.testing.assert_close(out, _embed_resampled(method.backbone, small))
    x = torch.randn(2, 3, 32, 32)  # the native size: the table is used as it is
    torch.testing.assert_close(embed(method.backbone, x), _embed_resampled(method.backbone, x))


def test_wrong_number_of_views_is_a_value_error() -> None:
    method = _build("simclr", VIT)
    with pytest.raises(ValueError, match="2 views"):
        method({"views": _views("simclr", 32)[:1]})


@pytest.mark.parametrize(
    ("cls", "bad"),
    [
        (SimCLRConfig, {"temperature": 0.0}),
        (MoCoV3Config, {"queue_size": -1}),
        (BYOLConfig, {"momentum": 1.5}),
        (SimSiamConfig, {"proj_dim": 0}),
        (DINOConfig, {"teacher_temp": -0.1}),
        (DINOConfig, {"centering": "mean"}),
        (BYOLConfig, {"predictor_lr_scale": 0.0}),
        (SimSiamConfig, {"predictor_lr_scale": -1.0}),
    ],
)
def test_invalid_configs_raise(cls: type, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="method"):  # models/ raises ValueError
        cls(**bad)
    with pytest.raises(ConfigError, match=r"^method\.|^method "):  # the loader: one line
        config_from_dict({"method": {"name": cls.name, **bad}})


def test_registry_builds_each_method() -> None:
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        method = create_method(cfg, VIT)
        assert type(method).__name__.lower().startswith(name[:4])
