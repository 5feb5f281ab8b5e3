"""The method contract: every hook the trainer and the checkpoint code call is declared on
``Method`` with a default; EMA machinery lives in ``EMAMethod``; frozen modules share one
precision policy; options a method cannot honour are refused at config time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from vitssl.models.ema import EMATeacher, FrozenModules, cosine_momentum
from vitssl.models.methods.base import EMAMethod, Method, StepContext
from vitssl.models.methods.byol import BYOL
from vitssl.models.methods.dino import DINO
from vitssl.models.methods.mocov3 import MoCoV3
from vitssl.models.registry import method_config_class
from vitssl.train.config import ConfigError, config_from_dict

ROOT = Path(__file__).resolve().parents[3]
CTX = StepContext(step=2, total_steps=10, steps_per_epoch=5)
HOOKS = (
    "forward",
    "before_step",
    "after_step",
    "no_weight_decay",
    "param_groups",
    "lr_scale",
    "teacher_to",
    "extra_state",
    "load_extra_state",
    "visualize",
)


class _Linear(Method):
    """The least a method defines: a backbone and a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 2)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.backbone(batch["views"][0]).square().mean()}


def test_every_hook_is_declared_on_method() -> None:
    for hook in HOOKS:
        assert callable(getattr(Method, hook, None)), hook
    assert Method.uses_labels is False


def test_defaults_of_a_method_that_defines_only_forward() -> None:
    m = _Linear()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.before_step(CTX)
    m.after_step(CTX)
    m.teacher_to("cpu", torch.float32)
    assert m.extra_state() == {}
    m.load_extra_state({})
    assert m.visualize({"views": [torch.zeros(1, 3)]}) is None
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])
    groups = m.param_groups(0.05)
    # the weight decays, the bias does not
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.05), (1, 0.0)]
    assert m.lr_scale(groups[0], CTX) == 1.0


def _method_call_hasattr(path: Path) -> list[int]:
    """Lines of ``hasattr(method, ...)`` / ``getattr(method, ...)`` in the file."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("hasattr", "getattr")
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "method"
        ):
            hits.append(node.lineno)
    return hits


def test_trainer_and_checkpoint_call_hooks_without_hasattr() -> None:
    for name in ("train/trainer.py", "train/checkpoint.py"):
        assert _method_call_hasattr(ROOT / name) == [], name


@pytest.mark.parametrize("cls", [BYOL, MoCoV3, DINO])
def test_ema_methods_share_the_ema_base(cls: type) -> None:
    assert issubclass(cls, EMAMethod)
    for hook in ("after_step", "momentum", "teacher_output"):
        assert getattr(cls, hook) is getattr(EMAMethod, hook), hook


class _Ema(EMAMethod):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
        self.head = nn.Linear(4, 3)
        self.init_teacher(("backbone", "head"), base_momentum=0.9)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.head(self.backbone(batch["views"][0])).sum()}


def test_ema_method_moves_teacher_by_cosine_momentum_and_round_trips_state() -> None:
    torch.manual_seed(0)
    m = _Ema()
    t0 = {k: v.clone() for k, v in m.extra_state().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.after_step(CTX)
    mom = cosine_momentum(0.9, CTX.progress)
    assert m.momentum(CTX) == pytest.approx(mom)
    students = dict(m.named_parameters())
    for k, v in m.extra_state().items():
        name = k.removeprefix("teacher.")
        torch.testing.assert_close(v, mom * t0[k] + (1 - mom) * students[name])
    fresh = _Ema()
    fresh.load_extra_state(m.extra_state())
    for k, v in fresh.extra_state().items():
        torch.testing.assert_close(v, m.extra_state()[k])
    x = torch.randn(2, 3, 2, 2)
    expected = m.teacher["head"](m.teacher["backbone"](x.flatten(1)))
    torch.testing.assert_close(m.teacher_output(x, "head"), expected)


def test_frozen_modules_precision_policy() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = FrozenModules({"net": net})
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
    assert not net.training
    x = torch.randn(5, 8)
    plain = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    plain.load_state_dict(ref)
    with frozen.autocast(x):  # float32 inputs: exact float32, no autocast
        torch.testing.assert_close(frozen["net"](x), plain(x), rtol=0, atol=0)
    xb = x.bfloat16()
    with frozen.autocast(xb):
        got = frozen["net"](xb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(xb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ema_teacher_is_frozen_modules() -> None:
    assert issubclass(EMATeacher, FrozenModules)


@pytest.mark.parametrize(
    "name", ["mae", "simclr", "simsiam", "distil", "finetune", "qat", "byol", "mocov3", "dino"]
)
def test_export_teacher_refused_at_config_time_without_a_teacher(name: str) -> None:
    raw = {"name": name, "export_teacher": True}
    if name == "distil":
        raw["teacher"] = "t"
    if method_config_class(name).has_teacher:
        assert config_from_dict({"method": raw, "train": {"steps": 1}}).method.export_teacher
    else:
        with pytest.raises(ConfigError, match=f"export_teacher.*{name} has none"):
            config_from_dict({"method": raw, "train": {"steps": 1}})
    assert method_config_class(name).has_teacher == (name in ("byol", "mocov3", "dino"))
