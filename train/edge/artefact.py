"""The self-describing artefact folder: models, preprocessing, classes, reports, card, infer.py.

::

    <out>/model.int8.onnx  model.fp32.onnx  [model.fp32.pt]  preprocess.json  [classes.json]
          report.json  report.md  MODEL_CARD.md  infer.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD

INFER = Path(__file__).resolve().parent / "infer.py"


def preprocess_spec(img_size: int, output: str) -> dict[str, Any]:
    """What ``build_transform("eval", img_size)`` does, stated for any runtime."""
    return {
        "input_name": "input",
        "input_size": img_size,
        "resize": round(img_size / 0.875),
        "resize_rule": "shorter side to `resize`, aspect kept",
        "interpolation": "bicubic",
        "crop": "center",
        "scale": "pixel / 255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "output": output,
    }


def model_card(report: dict[str, Any], meta: dict[str, Any]) -> str:
    q = meta.get("quantization", {})
    int8, fp32 = report["models"]["int8"], report["models"]["fp32"]
    lat = "; ".join(
        f"batch {b}: FP32 {fp32['latency'][b]['median_ms']:.2f} ms, "
        f"INT8 {int8['latency'][b]['median_ms']:.2f} ms"
        for b in fp32["latency"]
    )
    return "\n".join(
        [
            f"# Model card: {meta.get('name', 'model')}",
            "",
            "## What it is",
            f"- Source: `{meta.get('source', '?')}` ({meta.get('architecture', '?')}).",
            f"- Output: {report['output']}"
            + (" (class logits, see classes.json)" if report["output"] == "logits" else "")
            + ".",
            f"- Input: see preprocess.json ({meta.get('img_size')} px RGB, NCHW, ImageNet "
            "mean/std).",
            f"- ONNX exporter: {meta.get('exporter', '?')}; opset {meta.get('opset', '?')}.",
            "",
            "## Quantization",
            f"- ONNX Runtime static INT8, format {q.get('format', '?')}, activations "
            f"{q.get('activation_type', '?')} (symmetric: {q.get('symmetric_activations')}), "
            f"per-channel int8 weights: {q.get('per_channel')}, "
            f"7-bit reduced range: {q.get('reduce_range', False)}.",
            f"- Calibration: {q.get('calibration', '?')} on {q.get('calibration_images', '?')} "
            f"images of `{meta.get('calibration_data', '?')}`.",
            f"- Layers kept in float: {', '.join(q.get('kept_in_float', [])) or 'none'}"
            f" (float outputs: {q.get('float_outputs', 'never')}).",
            "",
            "## Measured (report.json)",
            f"- {report['task']}: FP32 {fp32['accuracy']:.2f}%, INT8 {int8['accuracy']:.2f}% "
            f"(drop {report['drop']:.2f}, accepted {report['max_drop']:.2f}; agreement "
            f"{int8['agreement']:.2f}%).",
            f"- Size: FP32 {fp32['size_bytes'] / 1024:.0f} KiB, INT8 "
            f"{int8['size_bytes'] / 1024:.0f} KiB ({report['size_ratio']:.2f}x).",
            f"- Latency (ONNX Runtime, {report['threads']} thread(s), {report['cpu']}): {lat}.",
            "",
            "## Use",
            "```",
            "pip install onnxruntime numpy pillow",
            "python infer.py image.jpg [more images] [--fp32]",
            "```",
            "",
            "## Limits",
            "- Evaluated only on the data named above; accuracy elsewhere is unknown.",
            "- INT8 speed depends on the CPU's integer dot-product instructions (VNNI).",
            "",
        ]
    )


def write_artefact(
    out: Path,
    *,
    fp32: Path,
    int8: Path,
    img_size: int,
    report: dict[str, Any],
    report_md: str,
    meta: dict[str, Any],
    classes: list[str] | None = None,
    torchscript: Path | None = None,
) -> Path:
    """Fill ``out`` (models copied unless already there); returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for src, name in ((fp32, "model.fp32.onnx"), (int8, "model.int8.onnx")):
        if Path(src).resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    if torchscript is not None and Path(torchscript).resolve() != (out / "model.fp32.pt").resolve():
        shutil.copyfile(torchscript, out / "model.fp32.pt")
    (out / "preprocess.json").write_text(
        json.dumps(preprocess_spec(img_size, report["output"]), indent=2) + "\n"
    )
    if report["output"] == "logits":
        if not classes:
            raise ValueError("a model with a head needs its class names (classes.json)")
        (out / "classes.json").write_text(json.dumps(list(classes), indent=2) + "\n")
    full = {**report, "meta": meta}
    (out / "report.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
    (out / "report.md").write_text(report_md)
    (out / "MODEL_CARD.md").write_text(model_card(report, meta))
    shutil.copyfile(INFER, out / "infer.py")
    return out
