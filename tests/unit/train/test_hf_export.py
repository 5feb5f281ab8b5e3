"""The Hugging Face layout of an export loads offline in timm and gives the encoder's features;
its config carries the preprocessing our evaluation uses; the card names the run."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from vitssl.train.hf_export import write_hf_export
from vitssl.train.weight_formats import build_model, load_external

CONFIG = {
    "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8},
    "method": {"name": "mae"},
    "data": {"train_shards": "s3://bucket/train-{000000..000003}.tar"},
    "train": {"micro_batch": 8, "steps": 7},
}


def _encoder(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8
    ).eval()
    weights = tmp_path / "encoder.safetensors"
    save_file(model.state_dict(), str(weights))
    return model, weights


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    rows = [{"step": 2, "loss": 1.0}, {"step": 4, "knn/top1": 0.25, "knn/top5": 0.75}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"protocol": "linear", "results": [{"encoder": "final", "top1": 0.625}]}
    (run / "eval" / "linear.json").write_text(json.dumps(record))
    return run


def test_timm_loads_the_export_offline_with_the_same_features(tmp_path: Path) -> None:
    model, weights = _encoder(tmp_path)
    out = write_hf_export(weights, tmp_path / "hf", CONFIG, 7, _run_dir(tmp_path))
    assert out is not None
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_features"] == 192
    assert config["model_args"]["img_size"] in (32, [32, 32])  # timm records it as a pair
    assert config["model_args"]["patch_size"] == 8 and config["model_args"]["num_classes"] == 0
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.875 and cfg["crop_mode"] == "center"
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.forward_features(x)
        # timm's local folder source: no network, config and weights from the folder
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.equal(local.forward_features(x), expected)
        assert local.pretrained_cfg["crop_pct"] == 0.875
        # or the weights file handed to a named model with the config's model_args
        overlay = timm.create_model(
            config["architecture"],
            pretrained=True,
            pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": 0},
            **config["model_args"],
        ).eval()
        assert torch.equal(overlay.forward_features(x), expected)
        # and our own reader of published formats takes it back (as model.init= would)
        ext = load_external(out)
        assert ext is not None and ext.format == "hf-timm" and not ext.missing
        assert torch.equal(build_model(ext).forward_features(x), expected)


def test_the_card_names_recipe_data_steps_and_results(tmp_path: Path) -> None:
    _, weights = _encoder(tmp_path)
    out = write_hf_export(weights, tmp_path / "hf", CONFIG, 7, _run_dir(tmp_path))
    assert out is not None
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    assert "**Method:** mae" in card and "**Steps:** 7" in card
    assert "s3://bucket/train-{000000..000003}.tar" in card
    assert "**Samples seen:** 56" in card  # 7 steps x micro-batch 8
    assert "linear final top1: 0.625" in card
    assert "online k-NN top-1 (step 4): 0.25" in card
