"""Encoder specs (export, random, bad inputs), online k-NN, and the eval recipe."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.evaluation.conftest import TINY_VIT, train_spec, val_spec
from vitssl.data_pipelines.labelled import LabelledReader
from vitssl.train.config import ConfigError
from vitssl.train.evaluation.config import load_eval_config
from vitssl.train.evaluation.encoders import load_encoder
from vitssl.train.evaluation.features import extract_features
from vitssl.train.evaluation.knn import knn_classify
from vitssl.train.evaluation.online import QUERY_EVERY, OnlineKNN


def test_export_loads_its_weights(export: Path) -> None:
    enc = load_encoder(str(export))
    state = load_file(str(export))
    assert enc.kind == "export" and not enc.model.training
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_random_init_is_seeded_and_differs_from_checkpoint(export: Path) -> None:
    a = load_encoder(str(export), random_init=True, seed=1)
    b = load_encoder(f"random:{TINY_VIT['name']}", img_size=32, patch_size=8, seed=1)
    assert a.kind == b.kind == "random"
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])
    assert not torch.equal(a.model.state_dict()[w], load_file(str(export))[w])


def test_bad_checkpoints_are_refused(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_encoder(str(tmp_path / "nope"))
    other = tmp_path / "other"
    shutil.copytree(export.parent, other)
    spec = json.loads((other / "encoder.json").read_text())
    spec["kwargs"]["patch_size"] = 4  # weights of patch 8 do not fit
    (other / "encoder.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not match the architecture") as e:
        load_encoder(str(other / "encoder.safetensors"))
    assert "\n" not in str(e.value)


def test_online_knn_matches_offline_split(shapes: Path, export: Path) -> None:
    enc = load_encoder(str(export))
    online = OnlineKNN(train_spec(shapes), None, 32, every=5, max_samples=25, k=3)
    assert online(3, enc.model, torch.device("cpu"), torch.float32) is None
    got = online(5, enc.model, torch.device("cpu"), torch.float32)
    assert got is not None and set(got) == {"knn/top1", "knn/top5"}
    f = extract_features(
        enc.model, LabelledReader(train_spec(shapes), 32, limit=25), torch.device("cpu")
    )
    q = torch.arange(25) % QUERY_EVERY == 0
    ref = knn_classify(f.feats[~q], f.labels[~q], f.feats[q], f.labels[q], 10, k=3)
    assert got["knn/top1"] == ref["distance/top1"]


def test_online_knn_off_without_labels(tmp_path: Path, export: Path) -> None:
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="JPEG")
    shard = tmp_path / "u-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    online = OnlineKNN(str(shard), None, 32, every=1, max_samples=10)
    model = load_encoder(str(export)).model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert online(1, model, torch.device("cpu"), torch.float32) is None
        assert online(2, model, torch.device("cpu"), torch.float32) is None
    assert sum("online k-NN is off" in str(w.message) for w in caught) == 1


def test_eval_recipe_builds_and_refuses_unknown_keys(shapes: Path) -> None:
    cfg = load_eval_config("eval_default", ["knn.k=5", f"data.val={val_spec(shapes)}"])
    assert cfg.knn.k == 5 and cfg.linear.head == "bn_linear"
    with pytest.raises(ConfigError, match=r"unknown key knn\.kk"):
        load_eval_config("eval_default", ["knn.kk=5"])
    with pytest.raises(ConfigError, match=r"encoder\.pool"):
        load_eval_config("eval_default", ["encoder.pool=max"])
