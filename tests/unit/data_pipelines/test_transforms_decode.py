from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.decode import CorruptSample, decode_image
from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, PRESETS, build_transform


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


LOW = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-4
HIGH = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD) + 1e-4


@pytest.mark.parametrize(
    "name,kw,sizes",
    [
        ("mae", {}, [32]),
        ("simclr", {}, [32, 32]),
        ("byol", {}, [32, 32]),
        ("dino", {}, [32, 32]),
        ("dino", {"local_crops": 3, "local_crop_size": 16}, [32, 32, 16, 16, 16]),
        ("eval", {}, [32]),
    ],
)
def test_preset_views(name: str, kw: dict, sizes: list[int]) -> None:
    tf = build_transform(name, 32, **kw)
    views = tf(photo(50, 40))
    assert [v.shape for v in views] == [(3, s, s) for s in sizes]
    for v in views:
        assert v.dtype == torch.float32
        assert float(v.min()) >= LOW and float(v.max()) <= HIGH


def test_eval_is_deterministic_and_matches_resize_center_crop() -> None:
    img = photo(64, 48)
    tf = build_transform("eval", 32)
    a, b = tf(img)[0], tf(img)[0]
    assert torch.equal(a, b)
    # independent computation: shorter side 32 / 0.875 = 37 (bicubic), centre 32x32
    resized = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    import torchvision.transforms.v2.functional as F

    ref = F.center_crop(
        F.resize(resized, 37, interpolation=F.InterpolationMode.BICUBIC, antialias=True), 32
    )
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(a, (ref.float() / 255 - mean) / std, atol=1e-5)


def test_mae_views_are_random_but_seedable() -> None:
    tf, img = build_transform("mae", 32), photo(80, 60)
    torch.manual_seed(1)
    a = tf(img)[0]
    torch.manual_seed(1)
    assert torch.equal(a, tf(img)[0])
    assert not torch.equal(a, tf(img)[0])


def test_unknown_preset_and_bad_options() -> None:
    assert set(PRESETS) == {"mae", "simclr", "byol", "dino", "eval"}
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        build_transform("moco", 32)
    with pytest.raises(ValueError, match="local crops"):
        build_transform("simclr", 32, local_crops=2)


def test_draft_decode_keeps_min_size_and_shrinks_big_images() -> None:
    data = encode(photo(1000, 700))
    full = decode_image(data)
    assert full.size == (1000, 700) and full.mode == "RGB"
    small = decode_image(data, min_size=160)
    assert min(small.size) >= 160 and small.size[0] < 1000
    assert small.size == (250, 175)  # 1/4 scale: 1/8 would give 87 < 160
    assert decode_image(data, min_size=700).size == (1000, 700)
    png = decode_image(encode(photo(300, 200).convert("L"), "PNG"), min_size=50)
    assert png.size == (300, 200) and png.mode == "RGB"  # not JPEG: full size, converted


def test_corrupt_bytes_raise_corrupt_sample() -> None:
    data = encode(photo(64, 64))
    with pytest.raises(CorruptSample):
        decode_image(b"definitely not an image")
    with pytest.raises(CorruptSample):
        decode_image(data[: len(data) // 2])
