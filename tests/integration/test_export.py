"""The export command end to end: artefact, refusal exit code, infer.py on image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitssl.train.edge_export import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vitssl.data_pipelines.synthetic import write_default_dataset

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
        'quant.schemes=["u8s8"]',
        'verify.runtimes=["onnxruntime"]',
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
    assert bad.returncode == 1  # some images failed; the good one is still embedded
    assert [json.loads(line)["image"] for line in bad.stdout.splitlines()] == [str(big)]
    assert "notes.txt: not a readable image" in bad.stderr.splitlines()[0]
    missing = subprocess.run(
        [*cmd, str(tmp_path / "nope.jpg")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: smooth colour gradients, a few shapes, sensor noise, a blur (what
    decoders and resize kernels see in photos; tests never use real photos)."""
    from PIL import ImageDraw, ImageFilter

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([c0 + c1 * x + c2 * y for c0, c1, c2 in rng.uniform(0, 160, (3, 3))], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(5, width // 2), y0 + rng.integers(5, height // 2)]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(0.8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An ImageFolder of photo-like JPEGs (sizes from CIFAR's to a phone's) and one PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (64, 48), (500, 375), (375, 500), (1600, 1200), (333, 77)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        path = folder / (f"p{i}.png" if i == 5 else f"p{i}.jpg")
        _photo(rng, w, h).save(path, quality=90)
        paths.append(path)
    return root, sorted(paths, key=lambda p: (p.parent.name, p.name))


def test_certifying_evaluation_and_infer_see_the_same_tensors(artefact, photos, tmp_path):
    """The export's evaluation (load_images) and infer.py on the same files: bit-identical
    input tensors, hence the same FP32 outputs, through a lone .onnx file."""
    from vitssl.train.edge import infer
    from vitssl.train.edge.data import load_images
    from vitssl.train.edge.verify import run_model

    root, paths = photos
    certified = load_images(str(root), 32)
    spec = json.loads((artefact / "preprocess.json").read_text())
    mine = np.stack([infer.preprocess(infer.decode(p, spec), spec) for p in paths])
    assert np.array_equal(certified.images, mine)  # bit-identical
    lone = tmp_path / "only" / "model.fp32.onnx"
    lone.parent.mkdir()
    lone.write_bytes((artefact / "model.fp32.onnx").read_bytes())  # nothing else beside it
    res = subprocess.run(
        [sys.executable, str(artefact / "infer.py"), "--model", str(lone), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    got = np.array([json.loads(line)["embedding"] for line in res.stdout.splitlines()])
    want = run_model(lone, certified.images)
    np.testing.assert_allclose(got, want, atol=1e-5)  # printed with 6 decimals


def test_deployment_preprocessing_is_close_to_the_training_eval_transform():
    """infer.py vs the project's eval transform (torchvision resize, libjpeg-turbo with the
    fast IDCT and fast chroma upsampling): the same geometry (resize rule, centre crop, JPEG
    draft scale), so lossless images agree within 1/255 (the two bicubic kernels round
    differently) and photos decoded at 1/4 or 1/8 scale within 0.05/255 on average; small
    JPEGs decoded at full or half size differ by the decoders' IDCT and chroma upsampling
    (measured: 2.6/255 mean at 32x32, 0.7/255 at 333x77)."""
    import io

    from vitssl.data_pipelines.decode import decode_pixels
    from vitssl.data_pipelines.transforms import build_transform
    from vitssl.train.edge import infer
    from vitssl.train.edge.preprocessing import deployment_spec

    spec = deployment_spec(32)
    transform = build_transform("eval", 32)
    std = np.asarray(spec["std"], np.float32).reshape(3, 1, 1)
    rng = np.random.default_rng(0)
    for w, h in [(32, 32), (64, 48), (500, 375), (375, 500), (1600, 1200), (333, 77)]:
        img = _photo(rng, w, h)
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            img.save(buf, fmt, quality=90)
            data = buf.getvalue()
            ours = infer.preprocess(infer.decode(data, spec), spec)
            ref = transform(decode_pixels(data, transform.decode_min_size))[0].numpy()
            levels = np.abs(ours - ref) * std * 255  # in 8-bit levels
            if fmt == "PNG":  # lossless: only the resize kernels' rounding
                assert levels.max() <= 1.0 + 1e-3 and levels.mean() < 0.05, (w, h)
            elif min(w, h) >= 4 * spec["resize"]:  # decoded at 1/4 or 1/8 of the DCT scale
                assert levels.mean() < 0.05, (w, h, levels.mean())
            else:
                assert levels.mean() < 3.0, (w, h, fmt, levels.mean())


def test_openvino_runs_the_same_files(artefact, photos):
    """The second runtime reads the same ONNX files, metadata included."""
    pytest.importorskip("openvino", reason="optional extra: pip install -e .[openvino]")
    from vitssl.train.edge.data import load_images
    from vitssl.train.edge.infer import Runner
    from vitssl.train.edge.verify import run_model

    root, _ = photos
    images = load_images(str(root), 32).images
    ov = Runner(artefact / "model.fp32.onnx", "openvino")
    assert json.loads(ov.meta["preprocess"]) == json.loads(
        (artefact / "preprocess.json").read_text()
    )
    np.testing.assert_allclose(
        run_model(artefact / "model.fp32.onnx", images, "openvino"),
        run_model(artefact / "model.fp32.onnx", images, "onnxruntime"),
        rtol=1e-3,
        atol=1e-3,
    )
    q_ov = run_model(artefact / "model.int8.onnx", images, "openvino")
    q_ort = run_model(artefact / "model.int8.onnx", images, "onnxruntime")
    cos = (q_ov * q_ort).sum(1) / np.linalg.norm(q_ov, axis=1) / np.linalg.norm(q_ort, axis=1)
    assert cos.min() > 0.95  # the same INT8 model; kernels round differently


def test_export_verifies_and_times_openvino_beside_onnxruntime(data, tmp_path):
    pytest.importorskip("openvino", reason="optional extra: pip install -e .[openvino]")
    args = [a for a in _args(data, tmp_path) if not a.startswith("verify.runtimes")]
    assert main([*args, 'verify.runtimes=["onnxruntime", "openvino"]', "--accept-drop"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    ov = report["runtimes"]["openvino"]
    assert set(ov["models"]) == {"fp32", "int8"} and set(ov["speedup"]) == {"1", "4"}
    assert any(c["check"] == "accuracy drop on openvino (points)" for c in report["checks"])
    assert "Same files on openvino" in (tmp_path / "report.md").read_text()
