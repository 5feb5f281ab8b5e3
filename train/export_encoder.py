"""Export the pretrained encoder as a safetensors state dict that loads into timm.

``python -m train.export_encoder RUN_DIR_OR_CHECKPOINT [--out DIR]`` consolidates the
fp32 master weights from the ZeRO partitions (DeepSpeed's ``zero_to_fp32``), keeps the
``backbone.`` parameters (or, with ``method.export_teacher``, the EMA teacher's backbone
from ``extra_state.safetensors``), and writes ``encoder.safetensors`` plus ``encoder.json`` (the
timm model name and the keyword arguments to rebuild it). :func:`load_encoder` reads it
back into ``timm.create_model`` of the same architecture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from train.checkpoint import MARKER, latest_complete, read_meta
from train.hf_export import write_hf_export

PREFIX = "backbone."
TEACHER_PREFIX = "teacher.backbone."


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the latest complete one of a run directory."""
    if (path / MARKER).is_file():
        return path
    found = latest_complete(path / "checkpoints")
    if found is None:
        raise ValueError(f"{path}: not a complete checkpoint nor a run directory with one")
    return found


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    has_partitions = any(ckpt.glob("*optim_states.pt"))
    if has_partitions:
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        except (ValueError, KeyError):
            pass  # stage 0 without partitioned optimizer: the module states hold it all
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ValueError(f"{ckpt}: no DeepSpeed model states found")
    # DeepSpeed's own file (it stores non-tensor metadata, so weights_only cannot read it).
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


def encoder_state(
    ckpt: Path, full: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The encoder's fp32 weights (timm names) in checkpoint ``ckpt``.

    The trained backbone, or the EMA teacher's when the run's method sets ``export_teacher``.
    ``full``: the checkpoint's consolidated state dict, when the caller already has it.
    """
    method = read_meta(ckpt)["config"]["method"]
    if method.get("export_teacher", False):
        extra = ckpt / "extra_state.safetensors"
        if not extra.is_file():
            raise ValueError(f"{ckpt}: method.export_teacher is set but there is no {extra.name}")
        source, prefix = load_file(str(extra)), TEACHER_PREFIX
    else:
        source, prefix = (consolidated_state_dict(ckpt) if full is None else full), PREFIX
    n = len(prefix)
    state = {k[n:]: v.float().contiguous() for k, v in source.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{ckpt}: no '{prefix}*' parameters in the checkpoint")
    return state


def encoder_spec(meta: dict[str, Any]) -> dict[str, Any]:
    model = meta["config"]["model"]
    return {
        "timm_name": model["name"],
        "kwargs": {
            "img_size": model["img_size"],
            "patch_size": model["patch_size"],
            "num_classes": 0,
        }
        if model["name"].startswith(("vit_", "deit_"))
        else {"num_classes": 0},
        "cifar_stem": model.get("cifar_stem", False),
        "method": meta["config"]["method"]["name"],
        "weights": "teacher" if meta["config"]["method"].get("export_teacher") else "backbone",
        "step": meta["step"],
    }


def export_encoder(path: Path, out_dir: Path) -> Path:
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    encoder = encoder_state(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "encoder.safetensors"
    save_file(encoder, str(weights))
    spec = encoder_spec(meta)
    spec["checkpoint"] = str(ckpt)
    (out_dir / "encoder.json").write_text(json.dumps(spec, indent=2) + "\n")
    write_hf_export(weights, out_dir / "hf", meta["config"], meta["step"], ckpt.parent.parent)
    return weights


def load_encoder(weights: Path) -> nn.Module:
    """Rebuild the timm model named in ``encoder.json`` and load the exported weights."""
    import timm

    spec_file = weights.with_suffix(".json")
    if not spec_file.is_file():
        raise ValueError(f"{weights}: missing {spec_file.name} beside it")
    spec = json.loads(spec_file.read_text())
    model = timm.create_model(spec["timm_name"], pretrained=False, **spec["kwargs"])
    if spec.get("cifar_stem"):
        from models.backbones import _cifar_stem

        _cifar_stem(model)
    state = load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{weights} does not match {spec['timm_name']}: {first}") from None
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("--out", type=Path, default=None, help="default: <run>/export")
    args = parser.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.path)
        out = args.out or ckpt.parent.parent / "export"
        print(export_encoder(ckpt, out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
