"""The export command end to end: artefact, refusal exit code, infer.py on image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.export import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_pipelines.synthetic import write_default_dataset

    root = tmp_path_factory.mktemp("export_data")
    write_default_dataset(root, train_per_class=10, val_per_class=5, shard_size=100)
    return root


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "artefact",
        "export_default",
        "model.checkpoint=random:mobilenetv3_small_050",
        f"data.train={data / 'train' / 'train-000000.tar'}",
        f"data.val={data / 'val' / 'val-000000.tar'}",
        f"output_dir={out}",
        "exporter=torchscript",
        "torchscript=false",
        "quant.calibration_images=32",
        "verify.repeats=2",
        "verify.warmup=0",
        "verify.batch_sizes=[1, 4]",
        "qat.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def artefact(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("artefact")
    # A threshold of -101 points can never be met: the command refuses (exit 3), writes the folder.
    assert main(_args(data, out, "verify.max_drop=-101")) == 3
    return out


def test_accept_drop_exits_zero(artefact, data, tmp_path):
    assert main([*_args(data, tmp_path, "verify.max_drop=-101"), "--accept-drop"]) == 0
    report = json.loads((artefact / "report.json").read_text())
    assert report["passed"] is False and report["max_drop"] == -101
    spec = json.loads((artefact / "preprocess.json").read_text())
    assert spec["channel_order"] == "RGB" and spec["layout"] == "NCHW"
    assert not (artefact / "classes.json").exists()  # an encoder: embeddings, no head


def test_infer_on_image_files_and_bad_inputs(artefact, tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(big)
    small = tmp_path / "small.jpg"
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(small)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(gray)
    cmd = [sys.executable, str(artefact / "infer.py")]
    res = subprocess.run(
        [*cmd, str(big), str(small), str(gray)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(big), str(small), str(gray)]
    assert all(r["dim"] == len(r["embedding"]) > 0 for r in rows)
    fp = subprocess.run([*cmd, str(big), "--fp32"], capture_output=True, text=True, timeout=60)
    assert fp.returncode == 0, fp.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    bad = subprocess.run([*cmd, str(big), str(text)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "not a readable image" in bad.stderr
    missing = subprocess.run(
        [*cmd, str(tmp_path / "nope.jpg")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_infer_preprocessing_matches_the_eval_transform(artefact, tmp_path):
    """infer.py (PIL only) vs data_pipelines' eval preset (torchvision) on one image."""
    sys.path.insert(0, str(artefact))
    try:
        import infer  # the copy in the artefact
    finally:
        sys.path.pop(0)
    from data_pipelines.transforms import build_transform

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).filter(
        __import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(2)
    )
    spec = json.loads((artefact / "preprocess.json").read_text())
    ours = infer.preprocess(img, spec)
    ref = build_transform("eval", spec["input_size"])(img)[0].numpy()
    assert ours.shape == ref.shape == (3, 32, 32)
    assert np.abs(ours - ref).mean() < 0.05
