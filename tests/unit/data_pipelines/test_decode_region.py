"""Region-of-interest decoding (decode.decode_region, the _jpeg_region C extension): the
pixels of a box equal that box of the whole-image decode, bit for bit, for every JPEG layout
the loader meets; the presets' views do not change when it is used."""

from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import vitssl.data_pipelines.decode as decode
from vitssl.data_pipelines.decode import (
    CorruptSample,
    add_restart_markers,
    decode_pixels,
    decode_region,
)
from vitssl.data_pipelines.transforms import build_transform

CAN_BUILD = shutil.which("cc") is not None and Path("/usr/include/jpeglib.h").is_file()
needs_extension = pytest.mark.skipif(
    not decode.region_decoder_available(),
    reason="the _jpeg_region extension is not built (no C compiler or libjpeg headers)",
)


def test_the_extension_is_built_where_it_can_be() -> None:
    """A machine with a C compiler and libjpeg's headers must not silently lose it."""
    if not CAN_BUILD:
        pytest.skip("no C compiler or /usr/include/jpeglib.h: the whole-image fallback is used")
    assert decode.region_decoder_available(), "reinstall: pip install -e . builds _jpeg_region"


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Detail at every scale: random blocks of 8 px, bilinearly enlarged, plus pixel noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
    noisy = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255)
    return Image.fromarray(noisy.astype(np.uint8)).convert(mode)


def jpeg(img: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


LAYOUTS = {
    "4:2:0": {"subsampling": 2},
    "4:2:2": {"subsampling": 1},
    "4:4:4": {"subsampling": 0},
    "progressive": {"progressive": True},
    "restart markers": {"restart_marker_rows": 1},
}


@needs_extension
@pytest.mark.parametrize("layout", [*LAYOUTS, "grayscale"])
def test_a_region_equals_that_box_of_the_whole_decode(layout: str) -> None:
    """Also from the same JPEG rewritten with a restart marker per MCU, whose region is
    decoded from the MCUs that cover it only."""
    mode = "L" if layout == "grayscale" else "RGB"
    data = jpeg(photo(203, 157, seed=len(layout), mode=mode), **LAYOUTS.get(layout, {}))
    rewritten = add_restart_markers(data)  # regions are then cut out of the stream by MCU
    rnd = random.Random(0)
    for reduction in (1, 2, 4, 8):
        whole = decode_pixels(data, reduction=reduction)  # simplejpeg: libjpeg-turbo too
        _, rows, cols = whole.shape
        boxes = [(0, 0, rows, cols), (rows - 1, cols - 1, 1, 1), (0, 0, 1, 1)]
        for _ in range(12):
            h, w = rnd.randint(1, rows), rnd.randint(1, cols)
            boxes.append((rnd.randint(0, rows - h), rnd.randint(0, cols - w), h, w))
        for top, left, h, w in boxes:
            for source in (data, rewritten):
                pixels, y0, x0 = decode_region(source, reduction, (top, left, h, w))
                assert (y0, x0) == (top, left) and pixels.shape == (3, h, w)
                assert torch.equal(pixels, whole[:, top : top + h, left : left + w])


@needs_extension
def test_bad_input_raises_clearly() -> None:
    data = jpeg(photo(64, 48, seed=1))
    with pytest.raises(CorruptSample):
        decode_region(data[: len(data) // 2], 1, (0, 0, 48, 64))  # truncated: no grey rows
    with pytest.raises(CorruptSample):
        decode_region(b"\xff\xd8" + b"\x00" * 100, 1, (0, 0, 1, 1))
    with pytest.raises(IndexError, match="outside"):
        decode_region(data, 1, (40, 0, 9, 64))
    with pytest.raises(ValueError, match="reduction"):
        decode_region(data, 3, (0, 0, 1, 1))


def test_cmyk_and_other_formats_fall_back_to_the_whole_image() -> None:
    cmyk = jpeg(photo(40, 30, seed=2).convert("CMYK"))
    pixels, y0, x0 = decode_region(cmyk, 1, (5, 5, 10, 10))
    assert (y0, x0) == (0, 0)
    assert torch.equal(pixels, decode_pixels(cmyk))
    png = io.BytesIO()
    photo(40, 30, seed=3).save(png, format="PNG")
    pixels, y0, x0 = decode_region(png.getvalue(), 1, (5, 5, 10, 10))
    assert (y0, x0) == (0, 0) and pixels.shape == (3, 30, 40)


@needs_extension
@pytest.mark.parametrize("name", ["mae", "simclr", "dino"])
def test_preset_views_are_the_same_with_and_without_region_decoding(name: str) -> None:
    """The optimisation changes no pixel of what the loader hands out."""
    data = jpeg(photo(500, 375, seed=4))  # ImageNet's median size
    kw = {"local_crops": 2, "local_crop_size": 32} if name == "dino" else {}
    tf = build_transform(name, 64, uint8=True, **kw)
    for seed in range(8):
        torch.manual_seed(seed)
        fast = tf.from_bytes(data)
        torch.manual_seed(seed)
        with mock.patch.object(decode, "_jpeg_region", None):
            whole = tf.from_bytes(data)
        for a, b in zip(fast, whole, strict=True):
            assert torch.equal(a, b)


@needs_extension
@pytest.mark.parametrize("layout", [*LAYOUTS, "grayscale"])
def test_restart_markers_are_lossless(layout: str) -> None:
    mode = "L" if layout == "grayscale" else "RGB"
    data = jpeg(photo(130, 97, seed=7, mode=mode), **LAYOUTS.get(layout, {}))
    rewritten = add_restart_markers(data)
    assert rewritten != data
    assert np.array_equal(  # PIL's accurate decode too: the same DCT coefficients
        np.asarray(Image.open(io.BytesIO(rewritten))), np.asarray(Image.open(io.BytesIO(data)))
    )
    assert torch.equal(decode_pixels(rewritten), decode_pixels(data))
    with pytest.raises(CorruptSample):
        add_restart_markers(data[: len(data) // 2])


@needs_extension
def test_the_mcus_outside_a_region_are_never_decoded() -> None:
    """Proof that the region is cut out of the stream: garbage in the entropy-coded bytes of
    the bottom half changes the whole-image decode but not a region of the top half."""
    data = add_restart_markers(jpeg(photo(256, 256, seed=8)))  # 4:2:0: 16 x 16 MCUs
    start = data.index(b"\xff\xda")
    start += 2 + int.from_bytes(data[start + 2 : start + 4], "big")  # first entropy byte
    end = len(data) - 2  # EOI
    bottom = start + (end - start) * 3 // 4  # an MCU well inside the bottom half
    found = re.compile(rb"\xff[\xd0-\xd7]").search(data, bottom)  # the next restart marker
    assert found is not None
    marker = found.start()
    garbled = bytearray(data)
    garbled[marker + 2 : marker + 6] = b"\x12\x34\x56\x78"
    garbled = bytes(garbled)
    assert not torch.equal(decode_pixels(garbled), decode_pixels(data))
    pixels, _, _ = decode_region(garbled, 1, (0, 0, 64, 256))
    assert torch.equal(pixels, decode_pixels(data)[:, :64])


@needs_extension
def test_damaged_files_raise_or_decode_but_never_crash() -> None:
    """The C code parses untrusted bytes: flipped, cut and repeated bytes anywhere (header,
    restart markers, entropy data) give CorruptSample or pixels of the right shape."""
    rnd = random.Random(1)
    sources = [jpeg(photo(96, 72, seed=5)), add_restart_markers(jpeg(photo(96, 72, seed=6)))]
    outcomes = {"raised": 0, "decoded": 0}
    for trial in range(300):
        data = bytearray(sources[trial % 2])
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(2, len(data))
            kind = rnd.random()
            if kind < 0.5:
                data[at] = rnd.randrange(256)
            elif kind < 0.75:
                del data[at : at + rnd.randint(1, 40)]
            else:
                data[at:at] = data[max(0, at - 30) : at]
        box = (rnd.randrange(0, 40), rnd.randrange(0, 40), rnd.randint(1, 30), rnd.randint(1, 50))
        try:
            pixels, _, _ = decode_region(bytes(data), rnd.choice((1, 2)), box)
        except (CorruptSample, IndexError):
            outcomes["raised"] += 1
        else:
            assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
            outcomes["decoded"] += 1
    assert outcomes["raised"] > 0 and outcomes["decoded"] > 0
