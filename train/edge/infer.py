"""Classify or embed image files with the INT8 (default) or FP32 ONNX model of this folder.

    python infer.py image1.jpg image2.png [--fp32] [--threads N] [--top K]

Standalone: needs only onnxruntime, numpy and Pillow. The preprocessing is read from
``preprocess.json`` beside this file (resize of the shorter side, centre crop, RGB, scale to
[0, 1], mean/std normalisation, NCHW float32), so images of any size work. Prints one JSON
line per image: the top classes with probabilities when ``classes.json`` exists (a model with
a head), else the embedding. Exit codes: 0 done, 2 an unreadable or missing input file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_image(path: Path) -> Image.Image:
    """An RGB image, or ValueError with a one-line reason."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None


def preprocess(img: Image.Image, spec: dict) -> np.ndarray:
    """``(3, S, S)`` float32: shorter side to ``spec['resize']``, centre crop, normalise."""
    size, resize = int(spec["input_size"]), int(spec["resize"])
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), RESAMPLE[spec.get("interpolation", "bicubic")])
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (S, S, 3) RGB
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    x: np.ndarray = (pixels - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify or embed images with this model.")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--fp32", action="store_true", help="use model.fp32.onnx")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    parser.add_argument("--top", type=int, default=1, help="classes printed per image")
    parser.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec = json.loads((args.dir / "preprocess.json").read_text())
    try:
        batch = np.stack([preprocess(load_image(p), spec) for p in args.images])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    model = args.dir / ("model.fp32.onnx" if args.fp32 else "model.int8.onnx")
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: batch})[0]
    classes_file = args.dir / "classes.json"
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else None
    for path, row in zip(args.images, out, strict=True):
        if classes is not None:
            probs = softmax(row.astype(np.float64))
            top = np.argsort(-probs)[: max(1, args.top)]
            preds = [{"class": classes[i], "index": int(i), "prob": float(probs[i])} for i in top]
            print(json.dumps({"image": str(path), "top": preds}))
        else:
            emb = [round(float(v), 6) for v in row]
            print(json.dumps({"image": str(path), "dim": len(emb), "embedding": emb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
