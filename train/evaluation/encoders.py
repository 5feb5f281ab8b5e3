"""Any checkpoint -> a frozen backbone: run directories, checkpoints, exports, random inits.

An encoder spec is one of

* a run directory (its latest complete checkpoint) or a checkpoint directory: the ZeRO
  partitions are consolidated in memory (``train.export_encoder``), the backbone is rebuilt
  from the saved ``model`` config with ``models.backbones.create_backbone`` and loaded with
  the ``backbone.*`` weights;
* an exported ``encoder.safetensors`` (or the ``export/`` directory holding it), with its
  ``encoder.json``;
* ``random:<timm_name>``: a randomly initialised backbone of that name (``img_size`` and
  ``patch_size`` from the caller);
* ``pixels``: no network, the normalised image flattened to ``3 * img_size**2`` numbers (the
  raw-pixel baseline: a learnt feature is only useful where it beats this).

``random_init=True`` builds the architecture of any spec with fresh weights (the baseline
that every pretrained number is compared with); its weights depend only on ``seed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from models.backbones import create_backbone
from train.config import ConfigError, ModelConfig, build_dataclass

RANDOM_PREFIX = "random:"
PIXELS = "pixels"


class PixelEncoder(nn.Module):
    """The identity feature: ``(B, 3, H, W)`` normalised images -> ``(B, 3*H*W)``.

    Written by hand because it is the baseline itself: no timm model flattens its input.
    ``num_features`` lets linear heads size themselves as for any backbone.
    """

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.num_features = 3 * img_size * img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float()


@dataclass
class Encoder:
    """A backbone in eval mode and where it came from (written into every result)."""

    model: nn.Module
    arch: ModelConfig
    source: str
    """The resolved checkpoint or weights file, or ``random:<name>``."""
    kind: str
    """checkpoint, export, random or pixels."""
    info: dict[str, Any] = field(default_factory=dict)
    """Step, method and other metadata of the checkpoint."""

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "model": self.arch.name, **self.info}


def model_config(raw: dict[str, Any]) -> ModelConfig:
    """The ``model`` table of a saved config, for inference (no drop path, no checkpointing)."""
    try:
        cfg = build_dataclass(ModelConfig, dict(raw), "model")
    except ConfigError as e:
        raise ValueError(f"saved model config: {e}") from None
    cfg.drop_path_rate = 0.0
    cfg.grad_checkpointing = False
    return cfg


def _export_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".safetensors":
        return path
    for cand in (path / "encoder.safetensors", path / "export" / "encoder.safetensors"):
        if cand.is_file() and not (path / "checkpoints").is_dir():
            return cand
    return None


def resolve(spec: str, img_size: int = 32, patch_size: int = 4) -> tuple[str, ModelConfig, Any]:
    """(kind, architecture, location) of a spec without loading weights.

    ``location`` is the checkpoint directory, the safetensors file, or None for random.
    """
    from train.checkpoint import read_meta
    from train.export_encoder import resolve_checkpoint

    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX) :]
        raw = {"name": name, "img_size": img_size, "patch_size": patch_size}
        return "random", model_config(raw), None
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"checkpoint {spec!r} does not exist")
    weights = _export_file(path)
    if weights is not None:
        meta_file = weights.with_suffix(".json")
        if not meta_file.is_file():
            raise ValueError(f"{weights}: missing {meta_file.name} beside it")
        meta = json.loads(meta_file.read_text())
        raw = {"name": meta["timm_name"], "cifar_stem": bool(meta.get("cifar_stem", False))}
        kwargs = meta.get("kwargs", {})
        raw["img_size"] = kwargs.get("img_size", img_size)
        raw["patch_size"] = kwargs.get("patch_size", patch_size)
        return "export", model_config(raw), weights
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    return "checkpoint", model_config(meta["config"]["model"]), ckpt


def backbone_state(kind: str, location: Any) -> dict[str, torch.Tensor]:
    """fp32 backbone weights (timm names) of a checkpoint or export."""
    from train.export_encoder import encoder_state

    if kind == "export":
        return load_file(str(location))
    return encoder_state(location)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Strict load; a mismatch is one line naming the checkpoint and the architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ValueError(
            f"checkpoint {source} does not match the architecture {name}: {detail}"
        ) from None


def load_encoder(
    spec: str,
    *,
    random_init: bool = False,
    img_size: int = 32,
    patch_size: int = 4,
    seed: int = 0,
    expect: ModelConfig | None = None,
) -> Encoder:
    """Build the backbone of ``spec`` in eval mode, with its weights or (``random_init``) fresh.

    ``expect``, when given, is the architecture the caller needs (name, img_size, patch_size):
    a checkpoint of another architecture is refused.
    """
    if spec == PIXELS:
        arch = model_config({"name": PIXELS, "img_size": img_size, "patch_size": 1})
        pixels = PixelEncoder(img_size).eval()
        return Encoder(pixels, arch, PIXELS, PIXELS, {"img_size": img_size})
    kind, arch, location = resolve(spec, img_size, patch_size)
    if expect is not None:
        for key in ("name", "img_size", "patch_size"):
            if getattr(arch, key) != getattr(expect, key):
                raise ValueError(
                    f"checkpoint {spec} does not match the architecture: {key}="
                    f"{getattr(arch, key)!r} there, {getattr(expect, key)!r} expected"
                )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(arch)
    info: dict[str, Any] = {"img_size": arch.img_size, "patch_size": arch.patch_size}
    if random_init or kind == "random":
        source = f"{RANDOM_PREFIX}{arch.name}"
        info["seed"] = seed
        kind = "random"
    else:
        source = str(location)
        load_into(model, backbone_state(kind, location), source, arch.name)
        if kind == "checkpoint":
            from train.checkpoint import read_meta

            meta = read_meta(location)
            info.update(step=meta.get("step"), method=meta["config"]["method"]["name"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Encoder(model, arch, source, kind, info)
