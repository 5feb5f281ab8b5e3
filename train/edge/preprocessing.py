"""The deployment preprocessing, written once as data.

:func:`deployment_spec` is the single description (size, resize, crop, interpolation,
scale, mean/std, channel order, layout, background for transparency). It is stored in the
model file's metadata and ``preprocess.json``; the artefact's ``infer.py`` applies it with
its ``decode`` / ``preprocess``, and the export's certifying evaluation
(:func:`vitssl.train.edge.data.load_images`) calls those same two functions, so the accuracy the
report certifies is that of the tensors a device running ``infer.py`` computes.

It follows the project's eval transform (``vitssl.data_pipelines.transforms``, preset ``eval``):
shorter side to ``round(size / 0.875)`` (bicubic, antialiased), centre crop, ImageNet
mean/std. The two differ only by the decoders (Pillow's libjpeg with the accurate IDCT and
fancy upsampling vs libjpeg-turbo's fast IDCT in the training loader) and by the rounding of
the resize kernels (Pillow vs torchvision's port of it); tests bound that difference.
"""

from __future__ import annotations

from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875


def deployment_spec(img_size: int) -> dict[str, Any]:
    """The preprocessing of a model with ``img_size`` px inputs (JSON-ready)."""
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    return {
        "input_name": "input",
        "input_size": img_size,
        "resize": round(img_size / CROP_FRACTION),
        "resize_rule": "shorter side to `resize`, longer int(resize * long / short)",
        "interpolation": "bicubic",
        "crop": "center",
        "decode": "Pillow; JPEG draft (DCT) scale keeping the shorter side >= resize",
        "bit_depth": "16-bit >> 8",
        "background": [255, 255, 255],
        "scale": "pixel / 255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
    }
