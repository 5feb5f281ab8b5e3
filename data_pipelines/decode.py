"""Image decoding with reduced-size JPEG decoding (libjpeg DCT scaling via ``Image.draft``).

Draft rule: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size almost for free. We ask
for the smallest such scale whose *shorter side is still >= min_size*, so the decoded shorter
side lies in [min_size, 2 * min_size) for images at least twice that size, and images smaller
than ``2 * min_size`` are decoded at full size. With ``min_size`` = the output crop size, a crop
of the whole image is never upsampled; a RandomResizedCrop crop of area fraction s is upsampled
by at most 1/sqrt(s), exactly as it would be from an image pre-resized to that shorter side
(the usual practice of storing ImageNet at shorter side 256..512).

Two decoders share that rule: ``decode_image`` (PIL, returns an RGB image) and the faster
``decode_pixels`` (libjpeg-turbo through simplejpeg straight into a uint8 array, with the fast
IDCT and chroma upsampling; PIL for what is not a baseline/progressive YCbCr or gray JPEG),
which returns a uint8 (3, H, W) tensor of the same size for the presets of transforms.py.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

try:
    import simplejpeg
except ImportError:  # optional: decode_pixels then uses PIL
    simplejpeg = None


class CorruptSample(Exception):
    """The bytes of a sample could not be decoded as an image."""


def draft_request(width: int, height: int, min_size: int) -> tuple[int, int]:
    """The (w, h) to pass to ``Image.draft`` so that the shorter side stays >= ``min_size``."""
    short = min(width, height)
    if short <= min_size:
        return width, height
    # draft picks the largest 1/2^k reduction that keeps both sides >= the request.
    return -(-width * min_size // short), -(-height * min_size // short)


def draft_scale(width: int, height: int, min_size: int | None) -> int:
    """The reduction 1, 2, 4 or 8 that ``Image.draft`` picks for ``draft_request``."""
    if min_size is None:
        return 1
    want_w, want_h = draft_request(width, height, min_size)
    for scale in (8, 4, 2):
        if -(-width // scale) >= want_w and -(-height // scale) >= want_h:
            return scale
    return 1


def covering_reduction(needs: Sequence[tuple[int, int, int]]) -> int:
    """The largest reduction 1, 2, 4 or 8 at which every crop still covers its output:
    ``needs`` holds (crop height, crop width, output side) in full-size pixels. Only powers
    of two: libjpeg-turbo's M/8 scalings (7/8, 3/4, ...) decode slower than full size."""
    for reduction in (8, 4, 2):
        if all(h // reduction >= size and w // reduction >= size for h, w, size in needs):
            return reduction
    return 1


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header of a JPEG that ``decode_pixels`` decodes with
    libjpeg-turbo; None for anything else (PIL then decodes it at full size)."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in ("YCbCr", "Gray", "RGB") else None


def decode_pixels(
    data: bytes, min_size: int | None = None, *, reduction: int | None = None
) -> Tensor:
    """Decode to uint8 (3, H, W) (a channels-last view of an (H, W, 3) array), at the size
    ``decode_image`` gives for ``min_size``, or reduced ``reduction`` times (1, 2, 4 or 8;
    sides rounded up, as libjpeg does). JPEGs go through libjpeg-turbo (simplejpeg), the rest
    through PIL (which ignores ``reduction`` for formats other than JPEG)."""
    if reduction not in (None, 1, 2, 4, 8):
        raise ValueError(f"reduction must be 1, 2, 4 or 8, got {reduction}")
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            scale = reduction or draft_scale(width, height, min_size)
            pixels = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                fastdct=True,
                fastupsample=True,
                min_height=-(-height // scale),
                min_width=-(-width // scale),
            )
        except ValueError as exc:
            if "colorspace" not in str(exc).lower():  # CMYK and others: PIL converts them
                raise CorruptSample(f"cannot decode image ({len(data)} bytes): {exc}") from exc
        else:
            return torch.from_numpy(pixels).permute(2, 0, 1)
    img = decode_image(data, min_size, reduction=reduction)
    with warnings.catch_warnings():  # read-only buffer: nothing ever writes into it
        warnings.simplefilter("ignore")
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def jpeg_or_pixels(data: bytes) -> Tensor:
    """For decoding on the device: a JPEG whose header parses and that ends with its EOI
    marker (not truncated) as its bytes, 1-D uint8; anything else decoded here, (3, H, W)."""
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9":
        colorspace = "YCbCr"
        if simplejpeg is not None:
            try:
                colorspace = simplejpeg.decode_jpeg_header(data)[2]
            except ValueError:
                colorspace = ""
        if colorspace in ("YCbCr", "Gray"):  # what nvJPEG decodes to RGB
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_pixels(data)


def decode_image(
    data: bytes, min_size: int | None = None, *, reduction: int | None = None
) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, DCT-downscaled for JPEGs when allowed
    (``min_size``: the draft rule above; ``reduction``: exactly 1/2, 1/4 or 1/8)."""
    img: Image.Image
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and reduction is not None and reduction > 1:
            img.draft("RGB", (-(-img.width // reduction), -(-img.height // reduction)))
        elif min_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_request(img.width, img.height, min_size))
        img.load()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise CorruptSample(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img
