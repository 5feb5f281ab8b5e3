"""The exported encoder in timm's Hugging Face layout, with a model card.

``<export>/hf/`` holds ``config.json`` (``architecture``, ``num_features``, ``model_args``
and ``pretrained_cfg``: the mean, std, input size, interpolation and crop our evaluation
uses), ``model.safetensors`` and ``README.md``. The first two are written by timm's own
``save_for_hf``, so that ``timm.create_model("local-dir:<export>/hf", pretrained=True)``, or
``hf-hub:<user>/<repo>`` once the folder is uploaded, rebuilds the model with the weights.
The card is written here (timm's ``generate_readme`` lays it out): the recipe, the data, the
steps and the run's evaluation results.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from vitssl.data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD
from vitssl.models.backbones import timm_args

CROP_PCT = 0.875
"""The evaluation transform resizes to ``size / 0.875`` and centre-crops ``size``."""


def write_hf_export(
    weights: Path, out_dir: Path, config: dict[str, Any], step: int, run_dir: Path | None
) -> Path | None:
    """Write ``out_dir/{config.json, model.safetensors, README.md}`` for the encoder in
    ``weights`` (timm names) trained with run ``config`` for ``step`` steps. ``run_dir``
    supplies the evaluation results for the card. None (with a warning) for a backbone that
    timm cannot rebuild by name (the CIFAR stem of ResNets is ours, not timm's)."""
    import timm
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme  # not re-exported by timm.models

    model_cfg = config["model"]
    if model_cfg.get("cifar_stem"):
        warnings.warn("no Hugging Face export: model.cifar_stem is not a timm model", stacklevel=2)
        return None
    args = timm_args(model_cfg["name"], model_cfg["img_size"], model_cfg["patch_size"])
    state = load_file(str(weights))
    if "fc_norm.weight" in state and "norm.weight" not in state:
        args["global_pool"] = "avg"  # MAE's fine-tuning head: fc_norm on the token mean
    model = timm.create_model(model_cfg["name"], pretrained=False, num_classes=0, **args)
    model.load_state_dict(state, strict=True)
    size = int(model_cfg["img_size"])
    data_config = {
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "crop_pct": CROP_PCT,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    save_for_hf(
        model, str(out_dir), model_args=args, safe_serialization=True, data_config=data_config
    )
    card = model_card(config, step, int(model.num_features), run_dir)  # type: ignore[arg-type]
    (out_dir / "README.md").write_text(
        generate_readme(card, _title(config), "image-feature-extraction")
    )
    return out_dir


def _title(config: dict[str, Any]) -> str:
    return f"{config['model']['name']}.{config['method']['name']}"


def model_card(
    config: dict[str, Any], step: int, num_features: int, run_dir: Path | None
) -> dict[str, Any]:
    """The card's content for timm's ``generate_readme``."""
    data = config.get("data", {})
    train = config.get("train", {})
    details: dict[str, Any] = {
        "Model Type": "Image feature backbone (self-supervised)",
        "Method": config["method"]["name"],
        "Architecture": config["model"]["name"],
        "Image size": config["model"]["img_size"],
        "Features": num_features,
        "Pretraining data": data.get("train_shards") or "?",
        "Steps": step,
        "Samples seen": step * _global_batch(config),
    }
    if train.get("recipe"):
        details["Recipe"] = train["recipe"]
    results = evaluation_results(run_dir) if run_dir is not None else {}
    if results:
        details["Evaluation"] = results
    usage = (
        "```python\nimport timm\n\n"
        "model = timm.create_model('local-dir:PATH_TO_THIS_FOLDER', pretrained=True)\n"
        "cfg = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**cfg)\n"
        "features = model.forward_features(transform(image).unsqueeze(0))\n```\n"
    )
    recipe = {k: config[k] for k in ("model", "method", "optim", "train") if k in config}
    return {
        "description": "Encoder pretrained with this project; the exact run configuration "
        f"is below.\n\n```json\n{json.dumps(recipe, indent=1, default=str)}\n```",
        "details": details,
        "usage": usage,
        "tags": ["image-feature-extraction", "timm", config["method"]["name"]],
    }


def _global_batch(config: dict[str, Any]) -> int:
    train = config.get("train", {})
    return (
        int(train.get("micro_batch", 0))
        * int(train.get("grad_accum", 1) or 1)
        * int(train.get("world_size", 1) or 1)
    )


def evaluation_results(run_dir: Path) -> dict[str, str]:
    """``{what: value}`` from the run's evaluation files (``*.json`` written by the evaluate
    entry point, in the run directory or one level below) and its last online k-NN line."""
    found: dict[str, str] = {}
    for path in sorted([*run_dir.glob("*.json"), *run_dir.glob("*/*.json")]):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or "protocol" not in record:
            continue
        for row in record.get("results", []):
            label = " ".join(str(v) for k, v in row.items() if isinstance(v, str))
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    found[f"{record['protocol']} {label} {key}".replace("  ", " ")] = f"{value:g}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        knn = [r for r in map(_json_line, metrics.read_text().splitlines()) if "knn/top1" in r]
        if knn:
            found[f"online k-NN top-1 (step {knn[-1].get('step')})"] = f"{knn[-1]['knn/top1']:g}"
    return found


def _json_line(line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError:
        return {}
    return row if isinstance(row, dict) else {}
