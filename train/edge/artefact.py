"""The self-describing artefact folder: models, preprocessing, classes, reports, card, infer.py.

::

    <out>/model.int8.onnx  model.fp32.onnx  [model.fp32.pt]  preprocess.json  [classes.json]
          report.json  report.md  MODEL_CARD.md  infer.py

Each ONNX file also describes itself in its ``metadata_props`` (:func:`model_metadata`):
preprocessing, input and output names and shapes, class names or embedding size, the INT8
scheme, the source checkpoint and the verification result, each a JSON string. ONNX
Runtime (``get_modelmeta().custom_metadata_map``) and OpenVINO (``rt_info["framework"]``)
both expose them, so ``infer.py`` needs nothing but the model file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from vitssl.train.edge.onnx_export import INPUT_NAME, OUTPUT_NAME
from vitssl.train.edge.preprocessing import deployment_spec

INFER = Path(__file__).resolve().parent / "infer.py"


def preprocess_spec(img_size: int, output: str) -> dict[str, Any]:
    """The deployment preprocessing (:func:`deployment_spec`) and what the model outputs."""
    return {**deployment_spec(img_size), "output": output}


def model_metadata(
    model_file: str,
    img_size: int,
    report: dict[str, Any],
    meta: dict[str, Any],
    classes: list[str] | None,
) -> dict[str, str]:
    """The ``metadata_props`` of one model file of the artefact (values are JSON)."""
    out_dim = report["output_dim"]
    entries: dict[str, Any] = {
        "preprocess": preprocess_spec(img_size, report["output"]),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, img_size, img_size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", out_dim], "kind": report["output"]},
        "scheme": "fp32" if model_file.endswith("fp32.onnx") else report["scheme"],
        "source": meta.get("source", ""),
        "verification": {
            "verdict": report["verdict"],
            "task": report["task"],
            "fp32_accuracy": report["models"]["fp32"]["accuracy"],
            "int8_accuracy": report["models"]["int8"]["accuracy"],
            "drop": report["drop"],
            "speedup": report["speedup"],
            "runtime": report["runtime"],
            "cpu": report["cpu"],
        },
    }
    if report["output"] == "logits":
        entries["classes"] = list(classes or [])
    else:
        entries["embedding_dim"] = out_dim
    return {k: json.dumps(v) for k, v in entries.items()}


def write_metadata(path: Path, props: dict[str, str]) -> None:
    """Set ``metadata_props`` of an ONNX file in place (other entries kept)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


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
            f"- Scheme {q.get('scheme', '?')} (chosen by measurement among "
            f"{', '.join(report.get('schemes', {})) or 'one'}).",
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
            f"- Latency ({report['runtime']}, {report['threads']} thread(s), {report['cpu']}): "
            f"{lat}.",
            f"- Verdict: {report['verdict']}.",
            "",
            "## Use",
            "```",
            "pip install onnxruntime pillow      # or: pip install openvino pillow",
            "python infer.py image.jpg [more images] [--fp32] [--runtime openvino]",
            "python infer.py --model model.int8.onnx image.jpg   # a lone model file is enough",
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
    for name in ("model.fp32.onnx", "model.int8.onnx"):
        write_metadata(out / name, model_metadata(name, img_size, report, meta, classes))
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
