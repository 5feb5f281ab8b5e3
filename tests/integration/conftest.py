"""Fixtures for multi-process runs: small generated shards."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 training and 50 validation images of the default shape classes, 4 + 1 shards."""
    from data_pipelines.synthetic import write_default_dataset

    out = tmp_path_factory.mktemp("shards")
    write_default_dataset(out, train_per_class=20, val_per_class=5, img_size=32, shard_size=50)
    return out
