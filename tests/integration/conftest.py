"""Fixtures for multi-process runs: small generated shards."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 training and 50 validation images of the default shape classes, 4 + 1 shards."""
    from vitssl.data_pipelines.synthetic import write_default_dataset

    out = tmp_path_factory.mktemp("shards")
    write_default_dataset(out, train_per_class=20, val_per_class=5, img_size=32, shard_size=50)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-step MAE run (ZeRO-2, bf16, one process): one complete checkpoint whose
    optimizer states hold DeepSpeed's own classes (loss scaler, ZeRO stage enum)."""
    from tests.integration.runs import TINY, shard_overrides, spawn

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    args = ["mae_vit_tiny_demo", *TINY, *shard_overrides(tiny_shards), "train.steps=2"]
    proc = spawn(1, [*args, "train.zero=zero2", "train.precision=bf16", f"train.output_dir={run}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return run
