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

``decode_region`` decodes only one box of the (reduced) image, with libjpeg-turbo's
region-of-interest decoding (``_jpeg_region.c``, a small C extension: no Python binding
exposes ``jpeg_skip_scanlines``/``jpeg_crop_scanline``). Rows below the box are never
decoded, rows above it are only entropy-decoded, columns beside it skip the IDCT, upsampling
and colour conversion: about 20 % of the decode time of a RandomResizedCrop view of a
full-size photo (entropy decoding, which cannot be skipped, is ~60 % of a decode). Its pixels
equal that box of ``decode_pixels`` (the same fast IDCT and upsampling; tested). Without the
extension (no C compiler or libjpeg headers at install) it decodes the whole image.
In JPEGs with a restart marker after every MCU (``add_restart_markers``, the opt-in
``make_shards --restart-markers``) it also skips the entropy decoding outside the region.
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
try:
    from vitssl.data_pipelines import _jpeg_region  # type: ignore[attr-defined]
except ImportError:  # optional (built at install when libjpeg's headers are there)
    _jpeg_region = None

EXTENSION_MISSING = (
    "the _jpeg_region extension (a C compiler and libjpeg's headers, e.g. apt-get install gcc"
    " libjpeg-dev, then pip install -e . again)"
)

Box = tuple[int, int, int, int]
"""(top, left, height, width) of a box of image pixels."""


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


def region_decoder_available() -> bool:
    """Whether ``decode_region`` decodes regions (the C extension is built)."""
    return _jpeg_region is not None


def decode_region(data: bytes, reduction: int, box: Box) -> tuple[Tensor, int, int]:
    """Pixels holding ``box`` of a JPEG reduced ``reduction`` times (1, 2, 4 or 8; its sides
    rounded up, as libjpeg does), as uint8 (3, h, w) (channels-last), and the (top, left) of
    those pixels in the reduced image. With the extension: exactly the box; without it, or
    for a colour space it does not decode (CMYK), the whole image at (0, 0). Raises
    ``CorruptSample``."""
    if reduction not in (1, 2, 4, 8):
        raise ValueError(f"reduction must be 1, 2, 4 or 8, got {reduction}")
    if _jpeg_region is not None and data[:2] == b"\xff\xd8":
        top, left, height, width = box
        try:
            pixels = _jpeg_region.decode_region(data, reduction, top, left, height, width)
        except ValueError as exc:
            if "colorspace" not in str(exc):
                raise CorruptSample(f"cannot decode image ({len(data)} bytes): {exc}") from exc
        else:
            flat = torch.frombuffer(pixels, dtype=torch.uint8)
            return flat.view(height, width, 3).permute(2, 0, 1), top, left
    return decode_pixels(data, reduction=reduction), 0, 0


def add_restart_markers(data: bytes) -> bytes:
    """The same JPEG rewritten losslessly (DCT coefficients copied, so it decodes to the same
    pixels; sequential even from a progressive file; optimised Huffman tables) with a restart
    marker after every MCU. ``decode_region`` then cuts a region's MCUs out of the stream
    without entropy decoding the rest: a RandomResizedCrop view of a full-size photo decodes
    in ~0.67 ms instead of ~0.84 (whole image: ~1.06), for ~7 % more bytes and a whole-image
    decode ~5 % slower (measured on ImageNet photos; README). Raises ``CorruptSample``;
    RuntimeError without the extension."""
    if _jpeg_region is None:
        raise RuntimeError(f"restart markers need {EXTENSION_MISSING}")
    try:
        return bytes(_jpeg_region.add_restart_markers(data))
    except ValueError as exc:
        raise CorruptSample(f"cannot rewrite image ({len(data)} bytes): {exc}") from exc


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
