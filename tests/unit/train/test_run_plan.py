"""Run length and batch in the papers' units (train/run_plan.py), checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vitssl.train.config import ConfigError, load_config
from vitssl.train.run_plan import apply_run_plan, plan_run, resolve_run_plan
from vitssl.train.schedules import warmup_cosine

IN1K = 1_281_167
MAE = [
    "train.micro_batch=64",
    "train.global_batch=4096",
    "train.epochs=800",
    "train.steps=0",
    "optim.warmup_steps=0",
    "optim.warmup_epochs=40",
    "train.grad_accum=1",
]


@pytest.mark.parametrize("world, accum", [(8, 8), (16, 4), (32, 2), (64, 1)])
def test_node_count_does_not_change_the_recipe(world: int, accum: int) -> None:
    cfg = load_config("mae_vit_base_in1k", MAE)
    plan = resolve_run_plan(cfg, world, IN1K)
    assert (plan.grad_accum, plan.global_batch) == (accum, 4096)
    assert plan.steps == math.ceil(800 * IN1K / 4096)
    assert plan.warmup_steps == round(40 * IN1K / 4096)
    assert plan.peak_lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert plan.epochs == 800 and not plan.notes


def test_unreachable_global_batch_is_refused_or_rescaled() -> None:
    cfg = load_config("mae_vit_base_in1k", MAE)
    with pytest.raises(ConfigError, match="not reachable") as e:
        resolve_run_plan(cfg, 3, IN1K)  # 4096 is no multiple of 64 x 3
    assert "\n" not in str(e.value)
    cfg = load_config("mae_vit_base_in1k", [*MAE, "train.allow_batch_change=true"])
    plan = resolve_run_plan(cfg, 3, IN1K)
    got = round(4096 / 192) * 192  # nearest reachable: 21 x 192 = 4032
    assert (plan.global_batch, plan.grad_accum) == (got, 21)
    assert plan.peak_lr == pytest.approx(1.5e-4 * got / 256)  # linear scaling rule
    assert plan.steps == math.ceil(800 * IN1K / got)  # epochs kept
    assert "4032 instead of 4096" in plan.notes[0]


def test_steps_override_epochs_and_old_style_batch_still_works() -> None:
    cfg = load_config("mae_vit_base_in1k", [*MAE, "train.steps=10"])
    plan = resolve_run_plan(cfg, 8, IN1K)
    assert plan.steps == 10 and plan.epochs == pytest.approx(10 * 4096 / IN1K)
    assert "overrides train.epochs" in plan.notes[0]
    cfg = load_config("mae_vit_tiny_demo", ["train.grad_accum=3", "train.micro_batch=4"])
    plan = resolve_run_plan(cfg, 2, 1000)
    assert (plan.global_batch, plan.grad_accum, plan.steps) == (24, 3, cfg.train.steps)


def test_run_length_is_required() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config("mae_vit_tiny_demo", ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"one of optim\.warmup_epochs"):
        load_config("mae_vit_tiny_demo", ["optim.warmup_epochs=1", "optim.warmup_steps=5"])


def test_plan_is_printed_saved_and_applied(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vitssl.data_pipelines.synthetic import write_default_dataset

    write_default_dataset(
        tmp_path / "d", train_per_class=4, val_per_class=1, img_size=32, shard_size=100
    )
    shards = sorted((tmp_path / "d" / "train").glob("*.tar"))
    spec = ",".join(str(s) for s in shards)
    cfg = load_config(
        "mae_vit_tiny_demo",
        [
            f"data.train_shards={spec}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.steps=0",
            "train.epochs=3",
            "train.micro_batch=4",
            "train.global_batch=8",
            "optim.warmup_steps=0",
            "optim.warmup_epochs=1",
        ],
    )
    resolved = plan_run(cfg, 1, 0)
    n = 40  # 4 per class x 10 classes
    steps = math.ceil(3 * n / 8)
    assert (resolved.train.steps, resolved.train.grad_accum) == (steps, 2)
    assert resolved.optim.warmup_steps == n // 8
    saved = json.loads((tmp_path / "run" / "run_plan.json").read_text())
    peak = cfg.optim.base_lr * 8 / 256
    assert saved["samples_per_epoch"] == n and saved["global_batch"] == 8
    assert saved["schedules"]["lr"] == pytest.approx(
        [warmup_cosine(0, steps, peak, n // 8), warmup_cosine(steps - 1, steps, peak, n // 8)]
    )
    out = capsys.readouterr().out
    assert "accumulation 2, global batch 8" in out
    assert apply_run_plan(resolved, resolve_run_plan(resolved, 1, n)) == resolved  # idempotent
