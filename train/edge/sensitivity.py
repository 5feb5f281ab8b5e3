"""Which layers quantization hurts: quantize one layer alone, or all but one, and measure.

For every Conv / MatMul / Gemm node of the FP32 model, two experiments (each a full static
quantization with the same calibration data):

* ``alone``: only that node quantized; its cost is what it loses against FP32;
* ``excluded``: every node but that one quantized; its gain is what keeping it in float wins
  back against the fully quantized model.

The measure is agreement of predictions with FP32 (argmax, for logits) and the mean cosine
of the outputs (for any model), on evaluation images (labels not needed). Nodes are ranked
by the cosine they win back when excluded; the top ones are the ``exclude`` candidates.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vitssl.train.edge.onnx_export import ort_session, run_onnx
from vitssl.train.edge.quantize_ort import (
    QuantSettings,
    preprocess,
    quantizable_nodes,
    quantize_int8,
)
from vitssl.train.edge.verify import _mean_cosine

MODES = ("alone", "excluded")


def _score(ref: np.ndarray, out: np.ndarray, kind: str) -> dict[str, float]:
    score = {"cosine": _mean_cosine(ref, out)}
    if kind == "logits":
        score["agreement"] = 100.0 * float((ref.argmax(1) == out.argmax(1)).mean())
    return score


def scan(
    fp32: Path,
    calib: np.ndarray,
    images: np.ndarray,
    kind: str,
    settings: QuantSettings | None = None,
    *,
    modes: tuple[str, ...] = MODES,
    max_nodes: int = 0,
) -> dict[str, Any]:
    """Per-node sensitivity; ``max_nodes > 0`` limits the scan to the first nodes."""
    s = settings or QuantSettings()
    for m in modes:
        if m not in MODES:
            raise ValueError(f"sensitivity mode must be one of {MODES}, got {m!r}")
    ref = run_onnx(ort_session(Path(fp32), threads=0), images)
    with tempfile.TemporaryDirectory(prefix="sens_") as tmp:
        pre = preprocess(Path(fp32), Path(tmp) / "pre.onnx")
        nodes = quantizable_nodes(pre)
        if max_nodes > 0:
            nodes = nodes[:max_nodes]

        def measure(name: str, **kw: Any) -> dict[str, float]:
            path = quantize_int8(
                fp32, Path(tmp) / f"{name}.onnx", calib, s, preprocessed=pre, kind=kind, **kw
            )
            return _score(ref, run_onnx(ort_session(path, threads=0), images), kind)

        full = measure("full")
        rows = []
        for i, node in enumerate(nodes):
            row: dict[str, Any] = {"node": node}
            if "alone" in modes:
                row["alone"] = measure(f"a{i}", include=[node], exclude=[])
                row["alone_cost"] = 1.0 - row["alone"]["cosine"]
            if "excluded" in modes:
                row["excluded"] = measure(f"e{i}", exclude=[node])
                row["excluded_gain"] = row["excluded"]["cosine"] - full["cosine"]
            rows.append(row)
    key = "excluded_gain" if "excluded" in modes else "alone_cost"
    rows.sort(key=lambda r: -r[key])
    return {"full_int8": full, "ranked_by": key, "nodes": rows, "num_nodes": len(nodes)}


def top_nodes(result: dict[str, Any], k: int) -> list[str]:
    return [r["node"] for r in result["nodes"][:k]]


def write_report(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``sensitivity.json`` and ``sensitivity.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "sensitivity.json"
    js.write_text(json.dumps(result, indent=2) + "\n")
    full = result["full_int8"]
    lines = [
        "# Layer sensitivity to INT8",
        "",
        f"Fully quantized: output cosine {full['cosine']:.5f}"
        + (f", agreement {full['agreement']:.2f}%" if "agreement" in full else "")
        + f". Ranked by {result['ranked_by']} ({result['num_nodes']} nodes).",
        "",
        "| rank | node | cost alone (1 - cos) | gain when excluded (cos) |",
        "| ---: | --- | ---: | ---: |",
    ]
    for i, r in enumerate(result["nodes"], 1):
        cost = f"{r['alone_cost']:.5f}" if "alone_cost" in r else "-"
        gain = f"{r['excluded_gain']:+.5f}" if "excluded_gain" in r else "-"
        lines.append(f"| {i} | `{r['node']}` | {cost} | {gain} |")
    md = out_dir / "sensitivity.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md
