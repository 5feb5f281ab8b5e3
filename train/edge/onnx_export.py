"""FP32 export of any encoder or student: ONNX (dynamo exporter, else TorchScript-based) and
TorchScript, both checked against PyTorch.

The exported graph is an explicit, deterministic inference path (:class:`InferenceModel`):
eval mode, no masking, no augmentation; a ViT gives its class token (or patch mean), a CNN
its globally pooled features, and a model with a head gives logits. The batch axis is
dynamic (input ``input``: ``(batch, 3, S, S)`` float32, normalised; output ``output``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitssl.models.backbones import embed

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "output"
FP32_RTOL = 1e-4
"""Accepted FP32 difference from PyTorch, relative to the output scale (largest |output|):
float rounding grows with the values (2.8e-4 on the demo student, whose outputs reach 30)."""


class InferenceModel(nn.Module):
    """``images (B, 3, S, S) -> embedding (B, D)`` or, with a head, ``logits (B, C)``."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, pool: str = "cls"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pool = pool
        self.eval()

    @property
    def output_kind(self) -> str:
        return "logits" if self.head is not None else "embedding"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = embed(self.backbone, x, self.pool)  # (B, D)
        return self.head(feats) if self.head is not None else feats


def load_inference_model(
    spec: str, pool: str = "cls", img_size: int = 32, patch_size: int = 4
) -> tuple[InferenceModel, int]:
    """The encoder of ``spec`` (run dir, checkpoint, ``encoder.safetensors`` of a teacher or
    a student, or ``random:<timm_name>``) in eval mode, and its input size."""
    from vitssl.train.evaluation.encoders import load_encoder

    enc = load_encoder(spec, img_size=img_size, patch_size=patch_size)
    return InferenceModel(enc.model, pool=pool), int(enc.arch.img_size)


@dataclass
class ExportResult:
    path: Path
    exporter: str
    """dynamo or torchscript: the exporter that produced the file."""
    note: str = ""
    """Why the dynamo exporter was not used, when it was not."""
    max_abs_diff: float = float("nan")
    """Largest difference from PyTorch on a check batch (ONNX Runtime, FP32)."""


def _example(img_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=g)


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    program.save(str(path))


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )


def export_onnx(
    model: nn.Module,
    path: Path,
    img_size: int,
    *,
    exporter: str = "auto",
    opset: int = 18,
    check: bool = True,
    rtol: float = FP32_RTOL,
) -> ExportResult:
    """Write ``model`` (eval mode) as FP32 ONNX with a dynamic batch axis; check it with ORT.

    ``exporter="auto"`` tries the dynamo exporter and falls back to the TorchScript-based one
    with a logged note. Raises ``ValueError`` when ONNX Runtime differs from PyTorch by
    ``rtol`` times the largest |output| or more.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(img_size)
    note = ""
    used = exporter
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, x, path, opset)
            used = "dynamo"
        except Exception as e:  # the dynamo exporter raises many types; fall back on any
            if exporter == "dynamo":
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            note = f"dynamo exporter failed ({type(e).__name__}: {first[:200]}); used TorchScript"
            log.warning("ONNX export: %s", note)
            used = "torchscript"
    if used == "torchscript":
        _export_torchscript(model, x, path, opset)
    result = ExportResult(path, used, note)
    if check:
        result.max_abs_diff = check_onnx(model, path, img_size, rtol=rtol)
    return result


def ort_session(path: Path, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session with ``threads`` intra-op threads (0: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Outputs ``(N, ...)`` of a session over ``images (N, 3, S, S)`` in batches."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: np.ascontiguousarray(images[i : i + batch_size], np.float32)})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outs)


@torch.no_grad()
def check_onnx(
    model: nn.Module, path: Path, img_size: int, *, batch: int = 3, rtol: float = FP32_RTOL
) -> float:
    """Max abs difference PyTorch vs ONNX Runtime on a batch size not used at export; must
    stay under ``rtol`` times the output scale (largest |output|, at least 1)."""
    x = _example(img_size, batch, seed=1)
    ref = model.eval()(x).numpy()
    got = run_onnx(ort_session(path), x.numpy())
    if got.shape != ref.shape:
        raise ValueError(f"{path}: output shape {got.shape}, PyTorch gives {ref.shape}")
    diff = float(np.abs(got - ref).max())
    tol = tolerance(ref, rtol)
    if not diff < tol:
        raise ValueError(
            f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} >= {tol:.2e} "
            f"({rtol} x output scale {tol / rtol:.3g}; fp32_rtol sets it)"
        )
    return diff


def tolerance(ref: np.ndarray, rtol: float) -> float:
    """``rtol`` times the output scale: the largest |output|, at least 1."""
    return rtol * max(1.0, float(np.abs(ref).max()))


@torch.no_grad()
def export_torchscript(
    model: nn.Module, path: Path, img_size: int, rtol: float = FP32_RTOL
) -> Path:
    """``torch.jit.trace`` of the inference path, saved and checked on another batch size."""
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, _example(img_size), check_trace=False)
    traced.save(str(path))
    x = _example(img_size, 3, seed=1)
    ref = model(x)
    diff = float((torch.jit.load(str(path))(x) - ref).abs().max())
    tol = tolerance(ref.numpy(), rtol)
    if not diff < tol:
        raise ValueError(f"{path}: TorchScript differs from PyTorch by {diff:.2e} >= {tol:.2e}")
    return path
