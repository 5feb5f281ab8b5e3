"""DeepSpeed's monitor sections in a preset are accepted, checked by DeepSpeed's own model, and
reach the config handed to DeepSpeed unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import vitssl.train.ds_config as ds_config
from vitssl.train.config import ConfigError, load_config

MONITORS = {
    "tensorboard": {"enabled": True, "output_path": "runs/ds_tb", "job_name": "pretrain"},
    "csv_monitor": {"enabled": True, "output_path": "runs/ds_csv"},
    "wandb": {"enabled": False, "project": "vitssl"},
}


@pytest.fixture
def presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "ds_configs"
    shutil.copytree(ds_config.DS_CONFIGS_DIR, folder)
    monkeypatch.setattr(ds_config, "DS_CONFIGS_DIR", folder)
    return folder


def test_monitor_keys_pass_through_to_deepspeed(presets: Path) -> None:
    from deepspeed.monitor.config import get_monitor_config

    preset = json.loads((presets / "zero2.json").read_text())
    (presets / "zero2.json").write_text(json.dumps({**preset, **MONITORS}))
    ds = ds_config.build_ds_config(load_config("mae_vit_tiny_demo", []), 2)
    for key, section in MONITORS.items():
        assert ds[key] == section
    parsed = get_monitor_config(ds)  # what DeepSpeed's engine builds its monitors from
    assert parsed.enabled and parsed.csv_monitor.output_path == "runs/ds_csv"
    assert parsed.tensorboard.job_name == "pretrain" and not parsed.wandb.enabled


def test_a_misspelt_monitor_field_is_refused(presets: Path) -> None:
    preset = json.loads((presets / "zero2.json").read_text())
    (presets / "zero2.json").write_text(json.dumps({**preset, "tensorboard": {"enabeld": True}}))
    with pytest.raises(ConfigError, match=r"invalid monitor section.*enabeld"):
        ds_config.build_ds_config(load_config("mae_vit_tiny_demo", []), 2)
