"""Post-training static INT8 quantization with ONNX Runtime.

Per-channel symmetric INT8 weights, symmetric activations (``ActivationSymmetric``),
QDQ (default) or QOperator format, S8S8 (default) or U8S8, calibrated with MinMax, Entropy
or Percentile on images through the eval preprocessing. ``quant_pre_process`` (symbolic
shape inference and graph optimisation) runs first. Layers that quantization hurts can be
kept in float with ``exclude`` (ORT's ``nodes_to_exclude``; see ``vitssl.train.edge.sensitivity``),
and so is a classifier head by default (``float_outputs``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
ACTIVATION_TYPES = ("int8", "uint8")
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
FLOAT_OUTPUTS = ("logits", "always", "never")
SCHEMES: dict[str, dict[str, Any]] = {
    "u8s8": {"activation_type": "uint8", "symmetric_activations": False, "reduce_range": False},
    "s8s8": {"activation_type": "int8", "symmetric_activations": True, "reduce_range": False},
    "u8s8_rr": {"activation_type": "uint8", "symmetric_activations": False, "reduce_range": True},
}
"""The INT8 schemes the export can measure side by side (``quant.schemes``). All are QDQ
with per-channel symmetric int8 weights; the activations decide the integer kernels a CPU
runs. ``u8s8``: asymmetric uint8 activations, ONNX Runtime's fast x86 path (u8 x s8 with
VNNI ``vpdpbusd`` or AVX2 ``vpmaddubsw``). ``s8s8``: symmetric int8 activations, native on
ARM and OpenVINO, but without a kernel of that speed in ONNX Runtime on x86 without AMX
(0.26x of FP32 measured for the MobileNetV3 student). ``u8s8_rr``: ``u8s8`` with 7-bit
weights (``reduce_range``), which avoids ``vpmaddubsw``'s int16 saturation without VNNI."""


@dataclass
class QuantSettings:
    """How a model is quantized (also written into the report)."""

    calibration: str = "minmax"
    """minmax, entropy or percentile."""
    calibration_images: int = 128
    """Images from the calibration shards (eval preprocessing)."""
    format: str = "qdq"
    """qdq (QuantizeLinear/DequantizeLinear pairs) or qoperator (QLinearConv, ...)."""
    activation_type: str = "int8"
    """int8 (S8S8) or uint8 (U8S8); weights are always int8."""
    per_channel: bool = True
    """Per-output-channel weight scales."""
    symmetric_activations: bool = True
    """Zero point 0 for activations (ActivationSymmetric)."""
    reduce_range: bool = False
    """7-bit weights: avoids the saturation of U8S8 products on x86 CPUs without VNNI
    (AVX2's vpmaddubsw), as ONNX Runtime advises for such CPUs, at some precision."""
    exclude: list[str] = field(default_factory=list)
    """ONNX node names kept in float."""
    schemes: list[str] = field(default_factory=list)
    """INT8 schemes (:data:`SCHEMES`) quantized, verified and timed side by side; the
    artefact ships the fastest that meets the accuracy bounds. Empty: only the settings
    above (scheme ``custom`` unless they match one)."""
    float_outputs: str = "logits"
    """Keep the last Conv/MatMul/Gemm before each graph output in float: ``logits`` (for
    models with a classification head: 8-bit rounding of the logits flips close argmaxes,
    2.3 points of the toy CNN of the tests, 0.1 with the head in float; the head is small),
    ``always`` (also an embedding's last layer, which may be large: MobileNetV3's conv_head
    is 29 % of its weights) or ``never``."""

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(
                f"quant.calibration must be one of {CALIBRATION_METHODS}, got {self.calibration!r}"
            )
        if self.format not in FORMATS:
            raise ValueError(f"quant.format must be one of {FORMATS}, got {self.format!r}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ValueError(
                f"quant.activation_type must be one of {ACTIVATION_TYPES}, "
                f"got {self.activation_type!r}"
            )
        if self.calibration_images < 1:
            raise ValueError("quant.calibration_images must be >= 1")
        unknown = sorted(set(self.schemes) - set(SCHEMES))
        if unknown:
            raise ValueError(f"quant.schemes: unknown {unknown}; choose from {sorted(SCHEMES)}")
        if self.float_outputs not in FLOAT_OUTPUTS:
            raise ValueError(
                f"quant.float_outputs must be one of {FLOAT_OUTPUTS}, got {self.float_outputs!r}"
            )

    def for_scheme(self, name: str) -> QuantSettings:
        """These settings with the activation choices of scheme ``name`` (QDQ format)."""
        if name not in SCHEMES:
            raise ValueError(f"unknown INT8 scheme {name!r}; choose from {sorted(SCHEMES)}")
        return QuantSettings(**{**self.__dict__, **SCHEMES[name], "format": "qdq", "schemes": []})

    @property
    def scheme(self) -> str:
        """The name of the scheme these settings follow, or ``custom``."""
        for name, fields in SCHEMES.items():
            if self.format == "qdq" and all(getattr(self, k) == v for k, v in fields.items()):
                return name
        return "custom"

    def outputs_in_float(self, kind: str) -> bool:
        """Whether the layers before the outputs of a ``kind`` model (``logits`` or
        ``embedding``) stay in float."""
        return self.float_outputs == "always" or (self.float_outputs == kind == "logits")


def _reader_class() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Calibration batches from an array ``(N, 3, S, S)`` float32."""

        def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 16):
            self.images = images
            self.input_name = input_name
            self.batch_size = batch_size
            self._it: Iterator[dict[str, np.ndarray]] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = (
                {self.input_name: np.ascontiguousarray(self.images[i : i + self.batch_size])}
                for i in range(0, len(self.images), self.batch_size)
            )

    return ArrayReader


def calibration_reader(images: np.ndarray, input_name: str = "input", batch_size: int = 16):
    """A ``CalibrationDataReader`` over ``images (N, 3, S, S)`` float32."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be (N, 3, S, S) with N >= 1, got {images.shape}")
    return _reader_class()(images.astype(np.float32), input_name, batch_size)


def preprocess(fp32_path: Path, out_path: Path) -> Path:
    """ORT's ``quant_pre_process``; retries without symbolic shape inference if that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path), skip_optimization=False)
    except Exception as e:  # symbolic shape inference does not know every op
        log.warning("quant_pre_process: %s; retrying without symbolic shape inference", e)
        quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the Conv / MatMul / Gemm nodes of a (pre-processed) model, in graph order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in QUANTIZABLE_OPS]


def output_nodes(path: Path) -> list[str]:
    """The Conv / MatMul / Gemm nodes nearest to the graph outputs: walking back from each
    output through other nodes (activations, pooling, reshapes) to the first quantizable one."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in QUANTIZABLE_OPS:
            found.append(node.name)
        else:
            stack.extend(node.input)
    return sorted(found)


def float_nodes(int8_path: Path) -> list[str]:
    """Conv / MatMul / Gemm nodes a quantized model still computes in float. In QDQ a node
    runs in int8 when its input and weight come from DequantizeLinear nodes and its output
    goes to a QuantizeLinear (an excluded node may still read a dequantized input).
    QOperator turns the int8 ones into QLinear* ops."""
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)

    def int8(n: Any) -> bool:
        ins = all(producer.get(i) == "DequantizeLinear" for i in n.input[:2])
        return ins and consumers.get(n.output[0], []) == ["QuantizeLinear"]

    return [n.name for n in graph.node if n.op_type in QUANTIZABLE_OPS and not int8(n)]


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calib_images: np.ndarray,
    settings: QuantSettings | None = None,
    *,
    preprocessed: Path | None = None,
    exclude: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    kind: str = "embedding",
) -> Path:
    """Static INT8 quantization of ``fp32_path`` into ``out_path``.

    ``preprocessed``: an already pre-processed model (skips ``quant_pre_process``; the
    sensitivity scan quantizes one model many times). ``exclude`` / ``include`` override
    ``settings.exclude`` and restrict quantization to some nodes. ``kind``: what the model
    outputs (``logits`` or ``embedding``), for ``settings.float_outputs``.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    s = settings or QuantSettings()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[s.calibration]
    with tempfile.TemporaryDirectory(prefix="ortq_") as tmp:
        src = preprocessed or preprocess(Path(fp32_path), Path(tmp) / "pre.onnx")
        excluded = set(s.exclude if exclude is None else exclude)
        if s.outputs_in_float(kind):
            excluded |= set(output_nodes(src))
        quantize_static(
            str(src),
            str(out_path),
            calibration_data_reader=calibration_reader(calib_images),
            quant_format=QuantFormat.QDQ if s.format == "qdq" else QuantFormat.QOperator,
            per_channel=s.per_channel,
            activation_type=QuantType.QInt8 if s.activation_type == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=s.reduce_range,
            op_types_to_quantize=None,
            nodes_to_exclude=sorted(excluded),
            nodes_to_quantize=list(include) if include is not None else None,
            calibrate_method=method,
            extra_options={
                "ActivationSymmetric": s.symmetric_activations,
                "WeightSymmetric": True,
                "CalibTensorRangeSymmetric": s.symmetric_activations,
                "CalibMovingAverage": False,
            },
        )
    return out_path
