"""The artefact's infer.py on awkward inputs: bombs, huge JPEGs, 16-bit, alpha, bad files."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitssl.train.edge import infer
from vitssl.train.edge.onnx_export import InferenceModel, export_onnx
from vitssl.train.edge.preprocessing import deployment_spec

SPEC = deployment_spec(32)
INFER = Path(infer.__file__)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` RGB pixels, with one tiny IDAT: what a
    decompression bomb looks like before decoding (Pillow reads the size from IHDR)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(raw + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(infer.ImageError, match=r"30000x30000 = 900000000 pixels.*bomb"):
        infer.decode(bomb, SPEC)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    with pytest.raises(infer.ImageError, match="over the limit of 5000"):
        infer.decode(small, SPEC, max_pixels=5000)
    assert infer.decode(small, SPEC).size == (100, 100)


def test_huge_jpeg_is_decoded_at_a_reduced_dct_scale(tmp_path):
    path = tmp_path / "big.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(path)
    img = infer.decode(path, SPEC)
    # resize 37: libjpeg's largest reduction keeping the shorter side >= 37 is 1/8
    assert img.size == (500, 375)
    # under a limit below the full size (12 Mpx) but above the reduced one: still decoded
    assert infer.decode(path, SPEC, max_pixels=1_000_000).size == (500, 375)
    ref = Image.open(path)
    ref.draft("RGB", (500, 375))
    assert np.array_equal(np.asarray(img), np.asarray(ref.convert("RGB")))


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    opened = Image.open(path)
    assert opened.mode.startswith("I")  # Pillow opens 16-bit grey as I;16 / I
    saturated = np.asarray(opened.convert("RGB"))[..., 0]
    assert (saturated == 255).mean() > 0.9  # what a plain convert does: mostly white
    got = np.asarray(infer.decode(path, SPEC))
    assert got.shape == (64, 64, 3)
    expected = (values.astype(np.int64) // 257).astype(np.uint8)  # 16 -> 8 bits
    assert np.abs(got[..., 0].astype(int) - expected).max() <= 1
    assert np.array_equal(got[..., 0], got[..., 2])


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red 200 everywhere
    rgba[:4, :, 3] = 0  # top half transparent
    rgba[4:, :, 3] = 128  # bottom half half-transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = np.asarray(infer.decode(path, SPEC)).astype(int)
    assert (got[:4] == 255).all()  # transparent -> the white background
    a = 128 / 255
    want = np.array([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    assert np.abs(got[4:] - want).max() <= 1
    assert SPEC["background"] == [255, 255, 255]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    folder = tmp_path_factory.mktemp("lone")
    path = export_onnx(InferenceModel(net), folder / "m.onnx", 32, exporter="torchscript").path
    from vitssl.train.edge.artefact import write_metadata

    write_metadata(path, {"preprocess": json.dumps(SPEC), "embedding_dim": "4"})
    return path


def test_bad_images_are_reported_one_per_line_and_the_rest_processed(model_file, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 120, 200)).save(good)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    missing = tmp_path / "nope.jpg"
    cmd = [sys.executable, str(INFER), "--model", str(model_file)]
    res = subprocess.run(
        [*cmd, str(text), str(good), str(missing), str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == infer.EXIT_SOME_FAILED == 1
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(good)] and rows[0]["dim"] == 4
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 4  # one line per failed image, then the count
    assert "notes.jpg: not a readable image" in errors[0]
    assert "nope.jpg: no such file" in errors[1]
    assert "bomb.png" in errors[2] and "decompression bomb" in errors[2]
    assert errors[3] == "3 of 4 images failed"
    none = subprocess.run([*cmd, str(text)], capture_output=True, text=True, timeout=120)
    assert none.returncode == infer.EXIT_USAGE and none.stdout == ""
