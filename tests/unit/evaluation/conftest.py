"""Small generated data and a tiny encoder export for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitssl.models.backbones import create_backbone
from vitssl.train.config import ModelSection

TINY_VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default shape classes: 30 train (3 per class, 2 shards) and 20 val images."""
    from vitssl.data_pipelines.synthetic import write_default_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_default_dataset(out, train_per_class=3, val_per_class=2, img_size=32, shard_size=16)
    return out


def train_spec(root: Path) -> str:
    return str(root / "train" / "train-{000000..000001}.tar")


def val_spec(root: Path) -> str:
    return str(root / "val" / "val-{000000..000001}.tar")


@pytest.fixture(scope="session")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encoder.safetensors + encoder.json of a tiny ViT, as train.export_encoder writes."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(123)
    model = create_backbone(ModelSection(**TINY_VIT))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "encoder.safetensors")
    )
    spec = {
        "timm_name": TINY_VIT["name"],
        "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 0},
        "cifar_stem": False,
        "method": "mae",
        "step": 1,
    }
    (out / "encoder.json").write_text(json.dumps(spec))
    return out / "encoder.safetensors"
