"""Image decoding with reduced-size JPEG decoding (libjpeg DCT scaling via ``Image.draft``).

Draft rule: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size almost for free. We ask
for the smallest such scale whose *shorter side is still >= min_size*, so the decoded shorter
side lies in [min_size, 2 * min_size) for images at least twice that size, and images smaller
than ``2 * min_size`` are decoded at full size. With ``min_size`` = the output crop size, a crop
of the whole image is never upsampled; a RandomResizedCrop crop of area fraction s is upsampled
by at most 1/sqrt(s), exactly as it would be from an image pre-resized to that shorter side
(the usual practice of storing ImageNet at shorter side 256..512).
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError


class CorruptSample(Exception):
    """The bytes of a sample could not be decoded as an image."""


def draft_request(width: int, height: int, min_size: int) -> tuple[int, int]:
    """The (w, h) to pass to ``Image.draft`` so that the shorter side stays >= ``min_size``."""
    short = min(width, height)
    if short <= min_size:
        return width, height
    # draft picks the largest 1/2^k reduction that keeps both sides >= the request.
    return -(-width * min_size // short), -(-height * min_size // short)


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, DCT-downscaled for JPEGs when allowed."""
    img: Image.Image
    try:
        img = Image.open(io.BytesIO(data))
        if min_size is not None and img.format == "JPEG":
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
