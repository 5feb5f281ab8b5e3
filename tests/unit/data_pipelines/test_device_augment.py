from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitssl.data_pipelines.decode import decode_image, decode_pixels
from vitssl.data_pipelines.device_augment import DeviceViews, decode_batch
from vitssl.data_pipelines.loader import build_loader
from vitssl.data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

LOW = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-4
HIGH = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD) + 1e-4
PRESETS = [
    ("mae", {}, [32]),
    ("simclr", {}, [32, 32]),
    ("byol", {}, [32, 32]),
    ("dino", {"local_crops": 2, "local_crop_size": 16}, [32, 32, 16, 16]),
    ("eval", {}, [32]),
]


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=92)
    return out.getvalue()


def jpeg_batch(n: int = 6) -> dict:
    datas = [photo_jpeg(64 + 8 * i, 48 + 4 * i, i) for i in range(n)]
    return {
        "jpeg": [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas],
        "seed": torch.arange(100, 100 + n) * 7919,
    }


@pytest.mark.parametrize("name,kw,sizes", PRESETS)
def test_views_shapes_ranges_and_determinism(name: str, kw: dict, sizes: list[int]) -> None:
    batch = jpeg_batch()
    views = DeviceViews(name, 32, device="cpu", **kw)(batch)
    again = DeviceViews(name, 32, device="cpu", **kw)(batch)
    assert [v.shape for v in views] == [(6, 3, s, s) for s in sizes]
    for v, w in zip(views, again, strict=True):
        assert v.dtype == torch.float32 and torch.equal(v, w)
        assert float(v.min()) >= LOW and float(v.max()) <= HIGH
    if name != "eval":
        other = DeviceViews(name, 32, device="cpu", **kw)({**batch, "seed": batch["seed"] + 1})
        assert not torch.equal(views[0], other[0])


@pytest.mark.parametrize("name,kw,sizes", PRESETS)
def test_same_draws_as_the_cpu_path_on_the_same_pixels(
    name: str, kw: dict, sizes: list[int]
) -> None:
    """Same decoded pixels + same seed: the device path reproduces the CPU preset."""
    batch = jpeg_batch()
    pixels = [decode_pixels(t.numpy().tobytes()) for t in batch["jpeg"]]
    views = DeviceViews(name, 32, device="cpu", **kw)({**batch, "jpeg": pixels})
    tf = build_transform(name, 32, **kw)
    for row, (img, seed) in enumerate(zip(pixels, batch["seed"].tolist(), strict=True)):
        torch.manual_seed(seed)  # what the loader does for a sample on the CPU path
        ref = tf(img)
        for v, r in zip(views, ref, strict=True):
            torch.testing.assert_close(v[row], r, atol=1e-4, rtol=0)


def test_decode_batch_matches_cpu_decoders_within_a_few_levels() -> None:
    batch = jpeg_batch(3)
    decoded = decode_batch(batch["jpeg"], "cpu")
    for img, t in zip(decoded, batch["jpeg"], strict=True):
        ref = torch.from_numpy(np.array(decode_image(t.numpy().tobytes()))).permute(2, 0, 1)
        assert img.shape == ref.shape and img.dtype == torch.uint8
        assert (img.int() - ref.int()).abs().float().mean() < 1.0


def test_loader_on_device_carries_bytes_and_the_cpu_paths_seeds(id_shards: list[Path]) -> None:
    tf = build_transform("simclr", 16)
    args = dict(transform=tf, micro_batch=4, rank=0, world_size=1, seed=3, epoch=1)
    spec = ",".join(str(p) for p in id_shards)
    cpu = list(build_loader(spec, num_workers=2, **args))
    dev = list(build_loader(spec, num_workers=2, decode_on_device=True, **args))
    assert len(cpu) == len(dev) == 18
    views = DeviceViews.from_transform(tf, "cpu")
    for c, d in zip(cpu, dev, strict=True):
        assert "views" not in d and len(d["jpeg"]) == 4
        assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in d["jpeg"])
        assert torch.equal(c["index"], d["index"]) and torch.equal(c["sample_id"], d["sample_id"])
        out = views(d)
        assert [v.shape for v in out] == [v.shape for v in c["views"]]
        # same crops and colours; only the decoders differ (chroma upsampling on these noise
        # images: ~6 levels); unrelated views of such images differ by ~1 on average
        for v, w in zip(out, c["views"], strict=True):
            assert float((v - w).abs().mean()) < 0.25


def test_corrupt_jpeg_in_a_batch_is_named() -> None:
    batch = jpeg_batch(3)
    broken = bytearray(batch["jpeg"][1].numpy().tobytes())
    broken[200:600] = b"\x00" * 400
    batch["jpeg"][1] = torch.frombuffer(broken + b"\xff\xd9", dtype=torch.uint8)
    try:
        views = DeviceViews("mae", 32, device="cpu")(batch)
    except Exception as exc:  # a decoder may also accept damaged entropy data
        assert "batch item 1" in str(exc)
    else:
        assert views[0].shape == (3, 3, 32, 32)


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        DeviceViews("mae", 32, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,kw,sizes", PRESETS)
def test_cuda_views_agree_with_cpu_views(name: str, kw: dict, sizes: list[int]) -> None:
    batch = jpeg_batch()
    cpu = DeviceViews(name, 32, device="cpu", **kw)(batch)
    gpu = DeviceViews(name, 32, device="cuda", **kw)(batch)
    for c, g in zip(cpu, gpu, strict=True):
        assert g.device.type == "cuda" and g.shape == c.shape
        # nvJPEG vs libjpeg and the float resize kernel: a few levels, not different crops
        assert float((g.cpu() - c).abs().mean()) < 0.05
