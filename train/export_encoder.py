"""Export the pretrained encoder as a safetensors state dict that loads into timm.

``python -m vitssl.train.export_encoder RUN_DIR_OR_CHECKPOINT [--out DIR]`` consolidates the
fp32 master weights from the ZeRO partitions (weights-only, see ``vitssl.train.weights``), keeps
the ``backbone.`` parameters (or, with ``method.export_teacher``, the EMA teacher's backbone
from ``extra_state.safetensors``), and writes ``encoder.safetensors`` plus ``encoder.json``
(the timm model name and the keyword arguments to rebuild it), which
``train.weights.resolve_weights`` and ``train.evaluation.encoders.load_encoder`` read back.
Exit codes: 0 written, 2 bad input (not a checkpoint, a file that is not weights-only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from vitssl.models.backbones import timm_args
from vitssl.train.checkpoint import read_meta
from vitssl.train.hf_export import write_hf_export
from vitssl.train.weights import encoder_state, resolve_checkpoint


def encoder_spec(meta: dict[str, Any]) -> dict[str, Any]:
    model = meta["config"]["model"]
    return {
        "timm_name": model["name"],
        "kwargs": {
            **timm_args(model["name"], model["img_size"], model["patch_size"]),
            "num_classes": 0,
        },
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitssl.train.export_encoder", description=__doc__.splitlines()[0]
    )
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
    except OSError as e:  # an unwritable --out
        print(f"error: could not write {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
