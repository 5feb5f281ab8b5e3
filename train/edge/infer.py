"""Classify or embed image files with the model of this folder (or any model file we exported).

    python infer.py image1.jpg image2.png [--model FILE] [--fp32] [--runtime R] [--top K]

Standalone: needs Pillow, numpy and one runtime, ONNX Runtime (``pip install onnxruntime``)
or OpenVINO (``pip install openvino``, which reads the same ``.onnx`` files). The model file
describes itself: its ONNX metadata (``metadata_props``) carries the preprocessing, the
input and output names, the class names or embedding size, the quantization scheme, the
source checkpoint and the verification result, so a lone ``.onnx`` file is enough.

Preprocessing (the ``preprocess`` entry; the export's certifying evaluation runs this very
file's :func:`decode` and :func:`preprocess`): decode with Pillow (JPEGs at a reduced DCT
scale whose shorter side stays >= ``resize``: libjpeg's draft mode), 16-bit images scaled to
8 bits (``value >> 8``), transparency composited on ``background`` (white), RGB; shorter side
to ``resize`` (longer side ``int(resize * long / short)``, torchvision's rule), centre crop
``input_size``, ``pixel / 255``, ``(x - mean) / std``, NCHW float32.

One JSON line per image on stdout: the top classes with probabilities (a model with a head)
or the embedding. An image that cannot be used (missing, unreadable, over ``--max-pixels``
decoded pixels: a decompression bomb) is reported on its own stderr line and skipped; the
others are still processed. Exit codes: 0 all images done, 1 some images failed, 2 usage
error or no image could be used.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
MAX_PIXELS = 89_478_485
"""Default limit on decoded pixels (Pillow's own ``MAX_IMAGE_PIXELS``)."""
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
META_KEYS = (
    "preprocess",
    "input",
    "output",
    "classes",
    "embedding_dim",
    "scheme",
    "source",
    "verification",
)


class ImageError(ValueError):
    """An image that cannot be used, with a one-line reason."""


def draft_request(width: int, height: int, min_size: int) -> tuple[int, int]:
    """The (w, h) for ``Image.draft`` that keeps the shorter side >= ``min_size`` (libjpeg
    then picks the largest 1/2, 1/4 or 1/8 reduction that still covers it); the same rule
    as the training loader's ``data_pipelines.decode.draft_request``."""
    short = min(width, height)
    if short <= min_size:
        return width, height
    return -(-width * min_size // short), -(-height * min_size // short)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """8-bit RGB: 16-bit (and 32-bit integer) images scaled by ``>> 8`` (Pillow's own
    ``convert`` clips them, turning most of a 16-bit image white), alpha or a transparent
    palette entry composited on ``background``."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)  # (H, W), 0..65535 for 16-bit sources
        img = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode(
    source: Path | bytes,
    spec: dict[str, Any],
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """An RGB image decoded for ``spec``, or :class:`ImageError` with a one-line reason."""
    import io

    name = "image" if isinstance(source, bytes) else str(source)
    if isinstance(source, Path) and not source.is_file():
        raise ImageError(f"{name}: no such file")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, on the pixels actually decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            with img:
                if img.format == "JPEG":
                    img.draft("RGB", draft_request(img.width, img.height, int(spec["resize"])))
                if img.width * img.height > max_pixels:
                    raise ImageError(
                        f"{name}: {img.width}x{img.height} = {img.width * img.height} pixels "
                        f"to decode, over the limit of {max_pixels} (--max-pixels): refused as "
                        "a possible decompression bomb"
                    )
                img.load()
                return to_rgb(img, tuple(spec.get("background", (255, 255, 255))))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``resize`` and the longer ``int(resize * long / short)``:
    torchvision's ``resize(img, int)``, which the project's eval transform uses."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def preprocess(img: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """``(3, S, S)`` float32 for the model, from an RGB image (see the module docstring)."""
    size, resize = int(spec["input_size"]), int(spec["resize"])
    nw, nh = resized_size(*img.size, resize)
    img = img.resize((nw, nh), RESAMPLE[spec.get("interpolation", "bicubic")])
    # torchvision's center_crop: int(round((side - size) / 2.0))
    left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (S, S, 3) RGB
    if spec.get("channel_order", "RGB") == "BGR":
        pixels = pixels[..., ::-1]
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    x: np.ndarray = (pixels - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)  # (3, S, S)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Runner:
    """One model file on ONNX Runtime or OpenVINO: ``meta`` (its metadata) and ``run``."""

    def __init__(self, model: Path, runtime: str = "auto", threads: int = 1) -> None:
        if runtime == "auto":
            runtime = "onnxruntime" if _has("onnxruntime") else "openvino"
        self.runtime = runtime
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            self.sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
            self.input = self.sess.get_inputs()[0].name
            self.meta = dict(self.sess.get_modelmeta().custom_metadata_map)
        elif runtime == "openvino":
            import openvino as ov

            core = ov.Core()
            net = core.read_model(str(model))
            self.meta = {
                k: net.get_rt_info(["framework", k]).astype(str)
                for k in META_KEYS
                if net.has_rt_info(["framework", k])
            }
            # f32: on CPUs with AMX or AVX-512 BF16 OpenVINO would otherwise run the float
            # parts in bf16, and its "FP32" timings and outputs would be bf16's
            cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads > 0:
                cfg["INFERENCE_NUM_THREADS"] = threads
            self.compiled = core.compile_model(net, "CPU", cfg)
        else:
            raise ValueError(f"unknown runtime {runtime!r} (onnxruntime or openvino)")

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.runtime == "onnxruntime":
            return np.asarray(self.sess.run(None, {self.input: batch})[0])
        return np.asarray(self.compiled(batch)[0])


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _model_info(runner: Runner, folder: Path) -> tuple[dict[str, Any], list[str] | None]:
    """The preprocessing and class names: from the model file, else the folder's files."""
    if "preprocess" in runner.meta:
        spec = json.loads(runner.meta["preprocess"])
    else:
        spec = json.loads((folder / "preprocess.json").read_text())
    if "classes" in runner.meta:
        return spec, json.loads(runner.meta["classes"])
    classes_file = folder / "classes.json"
    return spec, json.loads(classes_file.read_text()) if classes_file.is_file() else None


def _print_row(path: Path, row: np.ndarray, classes: list[str] | None, top: int) -> None:
    if classes is not None:
        probs = softmax(row.astype(np.float64))
        best = np.argsort(-probs)[: max(1, top)]
        preds = [{"class": classes[i], "index": int(i), "prob": float(probs[i])} for i in best]
        print(json.dumps({"image": str(path), "top": preds}), flush=True)
    else:
        emb = [round(float(v), 6) for v in row]
        print(json.dumps({"image": str(path), "dim": len(emb), "embedding": emb}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify or embed images with this model.")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", type=Path, help="model file (default: model.int8.onnx here)")
    parser.add_argument("--fp32", action="store_true", help="use model.fp32.onnx")
    parser.add_argument(
        "--runtime", choices=("auto", "onnxruntime", "openvino"), default="auto",
        help="auto: ONNX Runtime if installed, else OpenVINO",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (0: all)")
    parser.add_argument("--top", type=int, default=1, help="classes printed per image")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="decoded pixel limit")
    parser.add_argument("--batch", type=int, default=32, help="images per model call")
    parser.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model or args.dir / ("model.fp32.onnx" if args.fp32 else "model.int8.onnx")
    if not model.is_file():
        print(f"error: {model}: no such model file", file=sys.stderr)
        return EXIT_USAGE
    try:
        runner = Runner(model, args.runtime, args.threads)
        spec, classes = _model_info(runner, model.parent)
    except (ImportError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    done = failed = 0
    for start in range(0, len(args.images), max(1, args.batch)):
        paths, rows = [], []
        for path in args.images[start : start + max(1, args.batch)]:
            try:
                rows.append(preprocess(decode(path, spec, args.max_pixels), spec))
                paths.append(path)
            except ImageError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                failed += 1
        if rows:
            for path, row in zip(paths, runner.run(np.stack(rows)), strict=True):
                _print_row(path, row, classes, args.top)
            done += len(rows)
    if failed:
        print(f"{failed} of {failed + done} images failed", file=sys.stderr)
        return EXIT_SOME_FAILED if done else EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
