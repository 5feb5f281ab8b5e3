from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitssl.data_pipelines.decode import CorruptSample, decode_image
from vitssl.data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, PRESETS, build_transform


def photo(width: int, height: int, seed: int = 0, block: int = 8) -> Image.Image:
    """Random colours on a ``block``-pixel grid, bilinearly interpolated."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // block + 1, width // block + 1, 3), dtype=np.uint8)
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
    assert set(PRESETS) == {"mae", "simclr", "byol", "dino", "eval", "finetune"}
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


def test_covering_reduction_keeps_every_crop_at_least_its_output_size() -> None:
    from vitssl.data_pipelines.decode import covering_reduction

    # (crop h, crop w, output): the largest r in 8, 4, 2, 1 with h // r and w // r >= output
    assert covering_reduction([(900, 1000, 224)]) == 4  # 900 // 4 = 225; 900 // 8 = 112
    assert covering_reduction([(900, 1000, 224), (500, 460, 224)]) == 2
    assert covering_reduction([(447, 900, 224)]) == 1  # 447 // 2 = 223 < 224
    assert covering_reduction([(2000, 2000, 96)]) == 8
    assert covering_reduction([(100, 80, 224)]) == 1  # smaller than the output: full size


@pytest.mark.parametrize("name,size", [("mae", 48), ("simclr", 40), ("dino", 48)])
def test_from_bytes_equals_the_full_size_decode_up_to_resampling(name: str, size: int) -> None:
    """Same draws as on the full-size image; decoded at the reduction that covers the crops."""
    from unittest import mock

    import vitssl.data_pipelines.transforms as transforms
    from vitssl.data_pipelines.decode import decode_pixels

    data = encode(photo(640, 480, seed=4, block=40))  # detail at the scale of the crops
    kw = {"local_crops": 2, "local_crop_size": 24} if name == "dino" else {}
    tf = build_transform(name, size, **kw)
    reductions = []
    real = transforms.decode_region

    def spy(data: bytes, reduction: int, box: tuple[int, int, int, int]):
        reductions.append(reduction)
        return real(data, reduction, box)

    same, unrelated = [], []
    for seed in range(12):
        torch.manual_seed(seed)
        with mock.patch.object(transforms, "decode_region", spy):
            fast = tf.from_bytes(data)
        torch.manual_seed(seed)
        full = tf(decode_pixels(data))  # full size, the same draws
        torch.manual_seed(seed + 100)
        other = tf(decode_pixels(data))
        for a, b, c in zip(fast, full, other, strict=True):
            assert a.shape == b.shape
            same.append(float((a - b).abs().mean()))
            unrelated.append(float((c - b).abs().mean()))
    # the same crops, resampled from a DCT-reduced image (libjpeg's scaled IDCT is a coarser
    # low-pass filter than an antialiased bicubic): ~4 grey levels (0.07 normalised) apart
    # on average (colour ops amplify it a little); unrelated crops of the image: ~0.9
    mean_same, mean_unrelated = sum(same) / len(same), sum(unrelated) / len(unrelated)
    assert mean_same < 0.1 and mean_same < mean_unrelated / 8
    assert any(r is not None and r > 1 for r in reductions)  # the fast path did reduce


def test_uint8_views_normalised_by_model_input_equal_the_float_views() -> None:
    from vitssl.data_pipelines.transforms import model_input

    data = encode(photo(120, 90, seed=2))
    for name in ("mae", "eval", "simclr"):
        f32, u8 = build_transform(name, 32), build_transform(name, 32, uint8=True)
        torch.manual_seed(0)
        ref = f32.from_bytes(data)
        torch.manual_seed(0)
        views = u8.from_bytes(data)
        for r, v in zip(ref, views, strict=True):
            assert v.dtype == torch.uint8 and r.dtype == torch.float32
            x = model_input(v.unsqueeze(0), torch.device("cpu"), torch.float32)[0]
            # geometry only: bit-identical; colour ops: rounded to 8 bits (half a level)
            tol = 0.0 if name != "simclr" else 0.5 / 255 / min(IMAGENET_STD) + 1e-6
            assert float((x - r).abs().max()) <= tol
        bf16 = model_input(views[0].unsqueeze(0), torch.device("cpu"), torch.bfloat16)
        assert bf16.dtype == torch.bfloat16 and bf16.shape == (1, 3, 32, 32)


def test_resized_crop_is_torchvisions_bit_for_bit_in_channels_last() -> None:
    import torchvision.transforms.v2.functional as F

    from vitssl.data_pipelines.transforms import BICUBIC, resized_crop

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        h_img, w_img = 40 + 7 * trial, 90 - 2 * trial
        hwc = torch.randint(0, 256, (h_img, w_img, 3), dtype=torch.uint8, generator=gen)
        pixels = hwc.permute(2, 0, 1)  # the decoder's layout
        h = int(torch.randint(1, h_img + 1, (1,), generator=gen))
        w = int(torch.randint(1, w_img + 1, (1,), generator=gen))
        top = int(torch.randint(0, h_img - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, w_img - w + 1, (1,), generator=gen))
        size = (16, 32, h)[trial % 3] if h == w else (16, 32)[trial % 2]
        ours = resized_crop(pixels, top, left, h, w, size)
        ref = F.resized_crop(pixels, top, left, h, w, [size, size], BICUBIC, antialias=True)
        assert torch.equal(ours, ref)
        if (h, w) != (size, size):
            assert ours.stride() == (1, 3 * size, 3)  # channels-last
