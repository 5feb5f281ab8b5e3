"""Config schema: recipes build, overrides apply, mistakes are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitssl.train.config import (
    RECIPES_DIR,
    ConfigError,
    RunConfig,
    config_from_dict,
    load_config,
    save_config,
)
from vitssl.train.ds_config import DS_CONFIGS_DIR, build_ds_config, check_ds_config

ROOT = Path(__file__).resolve().parents[3]


# eval_* and export_* recipes have their own schemas (train.evaluation, train.edge)
TRAINING_RECIPES = sorted(
    p.stem for p in RECIPES_DIR.glob("*.toml") if not p.stem.startswith(("eval_", "export_"))
)


@pytest.mark.parametrize("recipe", TRAINING_RECIPES)
def test_every_recipe_builds_with_every_preset(recipe: str) -> None:
    """Every preset builds, or (LARS, per-parameter clipping: zero0 + fp32 only) is refused
    in one line; the DeepSpeed batch is the run plan's at 8 ranks."""
    from vitssl.train.run_plan import apply_run_plan, resolve_run_plan

    for preset in sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json")):
        try:
            cfg = load_config(recipe, [f"train.zero={preset}"])
        except ConfigError as e:
            assert preset != "zero0" and "needs train.zero=zero0" in str(e), str(e)
            continue
        cfg = apply_run_plan(cfg, resolve_run_plan(cfg, 8, 1_281_167))
        ds = build_ds_config(cfg, world_size=8)
        assert ds["train_batch_size"] == cfg.train.micro_batch * cfg.train.grad_accum * 8
        if cfg.train.global_batch:
            assert ds["train_batch_size"] == cfg.train.global_batch


def test_overrides_are_typed_and_applied() -> None:
    cfg = load_config(
        "mae_vit_tiny_demo",
        [
            "optim.base_lr=1e-4",
            "train.steps=7",
            "method.mask_ratio=0.6",
            "optim.betas=[0.8, 0.9]",
            "train.output_dir=/tmp/x",
            "model.grad_checkpointing=true",
        ],
    )
    assert cfg.optim.base_lr == 1e-4 and cfg.train.steps == 7
    assert cfg.method.mask_ratio == 0.6  # type: ignore[attr-defined]
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.output_dir == "/tmp/x" and cfg.model.grad_checkpointing is True
    assert cfg.optim.peak_lr(512) == pytest.approx(1e-4 * 2)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=1e-4", "unknown key optim.lr"),
        ("bogus.key=1", "unknown key bogus"),
        ("method.mask_ratio=1.5", "method.mask_ratio must be in (0, 1)"),
        ("method.nope=1", "unknown key method.nope"),
        ("train.precision=fp8", "train.precision='fp8' is not one of"),
        ("train.zero=zero9", "train.zero='zero9' is not one of"),
        ("train.steps=ten", "train.steps must be an integer"),
        ("model.patch_size=5", "does not divide model.img_size"),
        ("method.name=nosuch", "unknown method 'nosuch'"),
        ("train.steps", "is not of the form"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
        ("optim.name=lars", "optim.name=lars needs train.zero=zero0 and train.precision=fp32"),
        ("model.channels_last=true", "model.channels_last is not supported: DeepSpeed 0.19"),
    ],
)
def test_config_errors_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("mae_vit_tiny_demo", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        load_config("nope", [])


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("mae_vit_tiny_demo", ["method.decoder_depth=3"])
    save_config(cfg, tmp_path / "config.json")
    again = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_ds_config_unknown_keys_refused() -> None:
    cfg = load_config("mae_vit_tiny_demo", [])
    ds = build_ds_config(cfg, 2)
    with pytest.raises(ConfigError, match="unknown DeepSpeed config key 'zero_optimisation'"):
        check_ds_config({**ds, "zero_optimisation": {"stage": 2}})
    with pytest.raises(ConfigError, match="invalid zero_optimization"):
        check_ds_config({**ds, "zero_optimization": {"stage": 2, "overlap_com": True}})
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["fp16"]["enabled"] is False
    assert json.loads(json.dumps(ds)) == ds


def test_cli_refuses_bad_key_before_any_process_group(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitssl.train.pretrain",
            "mae_vit_tiny_demo",
            "optim.lr=1",
            f"train.output_dir={tmp_path}/run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if "config error" in ln]
    assert lines == [
        "config error: unknown key optim.lr; valid keys of optim: base_lr, betas, "
        "clip_grad, clip_mode, fused, min_lr, name, warmup_epochs, warmup_steps, "
        "wd_schedule, weight_decay, weight_decay_end"
    ]
    assert not (tmp_path / "run").exists()
