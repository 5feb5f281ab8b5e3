"""Typed configuration of the export stage (recipes ``train/recipes/export_*.toml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vitssl.train.config import ConfigError, build_dataclass, load_raw
from vitssl.train.edge.onnx_export import EXPORTERS
from vitssl.train.edge.quantize_ort import QuantSettings
from vitssl.train.edge.verify import VerifySettings


@dataclass
class ExportModelSection:
    """The model that is exported."""

    checkpoint: str = ""
    """Run dir, checkpoint, encoder.safetensors (teacher or student), or random:<timm_name>."""
    pool: str = "cls"
    """ViT embedding: cls (class token) or avg (patch mean); CNNs always average."""
    img_size: int = 32
    """Resolution of a random:<timm_name> model (checkpoints carry their own)."""
    patch_size: int = 4
    """Patch size of a random:<timm_name> ViT."""

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "avg"):
            raise ConfigError(f"model.pool must be cls or avg, got {self.pool!r}")


@dataclass
class ExportDataSection:
    """Labelled shards (or ImageFolder directories), read through the eval preprocessing."""

    train: str = ""
    """The k-NN bank and, unless ``calibration`` is set, the calibration images."""
    val: str = ""
    """The evaluation images."""
    calibration: str = ""
    """Calibration images (default: ``train``)."""
    train_index: str = ""
    """index.json of the train shards (default: beside the first shard)."""
    val_index: str = ""
    """index.json of the val shards."""
    bank_limit: int = 2000
    """Train images in the k-NN bank (0: all)."""
    val_limit: int = 0
    """Evaluation images (0: all)."""

    def __post_init__(self) -> None:
        if not self.train or not self.val:
            raise ConfigError("data.train and data.val are required (labelled shards)")
        if self.bank_limit < 0 or self.val_limit < 0:
            raise ConfigError("data.bank_limit and data.val_limit must be >= 0")


@dataclass
class SensitivitySection:
    """Layer sensitivity scan (vitssl.train.edge.sensitivity) and float fall-back of the worst."""

    enabled: bool = False
    """Run the scan (one quantization per node and mode)."""
    exclude_top: int = 0
    """Keep the k most sensitive nodes in float."""
    max_nodes: int = 0
    """Scan only the first nodes (0: all)."""
    images: int = 64
    """Evaluation images used by the scan."""


@dataclass
class QATSection:
    """Quantization-aware fine-tune when PTQ loses more than verify.max_drop."""

    enabled: bool = False
    """Run it when the drop is too large."""
    steps: int = 100
    """Optimizer steps."""
    lr: float = 1e-4
    """AdamW learning rate."""
    batch_size: int = 32
    """Images per step."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("qat.steps and qat.batch_size must be >= 1, qat.lr > 0")


@dataclass
class ExportConfig:
    """Everything ``python -m vitssl.train.edge_export artefact`` needs."""

    model: ExportModelSection = field(default_factory=ExportModelSection)
    data: ExportDataSection = field(default_factory=ExportDataSection)
    quant: QuantSettings = field(default_factory=QuantSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    sensitivity: SensitivitySection = field(default_factory=SensitivitySection)
    qat: QATSection = field(default_factory=QATSection)
    output_dir: str = "runs/export_default"
    """The artefact folder."""
    exporter: str = "auto"
    """ONNX exporter: auto (dynamo, else TorchScript-based), dynamo or torchscript."""
    opset: int = 18
    """ONNX opset."""
    fp32_rtol: float = 1e-4
    """Accepted FP32 ONNX / TorchScript difference from PyTorch, relative to the output
    scale (largest |output|, at least 1)."""
    torchscript: bool = True
    """Also write model.fp32.pt (torch.jit.trace)."""
    compare_formats: bool = False
    """Also build and time QOperator and U8S8 variants (variants/ in the artefact)."""
    pt2e: bool = False
    """Also quantize with torchao's PT2E (X86InductorQuantizer) and report its accuracy."""

    def __post_init__(self) -> None:
        if not self.fp32_rtol > 0:
            raise ConfigError(f"fp32_rtol must be > 0, got {self.fp32_rtol}")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_export_config(recipe: str | None, overrides: list[str]) -> ExportConfig:
    return build_dataclass(ExportConfig, load_raw(recipe, overrides), "")
