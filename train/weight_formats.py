"""Published ViT weights -> a timm ViT backbone state dict, by key mapping, weights-only.

Formats recognised (``load_external``):

- ``timm``: a timm-named state dict in a ``.safetensors``/``.pth`` file (timm's own files,
  DINO's and DINOv2's released backbones, anything saved from ``timm.create_model``),
  optionally wrapped in ``state_dict``/``model`` and prefixed ``module.``; with ``model_name``
  the architecture is the one named, otherwise it is read off the tensor shapes.
- ``mae``: the official MAE checkpoint, ``{'model': state_dict}`` in timm names, whose
  ``decoder_*`` and ``mask_token`` (pretraining) or ``head.*`` (fine-tuned) are dropped.
- ``dino``: the official DINO training checkpoint, ``{'teacher': ..., 'student': ...}``
  with ``module.``/``backbone.`` prefixes; the teacher is taken (what DINO evaluates) and
  its projection ``head.*`` dropped.
- ``hf-timm``: a timm Hugging Face directory (``config.json`` with ``architecture``, and
  ``model.safetensors``), as timm's ``push_to_hub`` and our own export write it.
- ``hf-transformers``: a transformers directory (``config.json`` with ``model_type`` ``vit``
  or ``dinov2``, and ``model.safetensors``): ``ViTModel``/``Dinov2Model`` names mapped to timm's
  (separate query/key/value are concatenated into timm's ``qkv``).

Nothing is unpickled beyond tensors (safetensors, or ``torch.load(weights_only=True)`` with
``argparse.Namespace`` allowed, since MAE and DINO store their arguments in one).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

State = dict[str, Tensor]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


@dataclass
class ExternalWeights:
    """A backbone state dict in timm ViT names, and how to build the model it fits."""

    state: State
    format: str
    """``timm``, ``mae``, ``dino``, ``hf-timm`` or ``hf-transformers``."""
    model_name: str
    """A timm architecture; ``model_args`` override its defaults."""
    model_args: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    """Source keys that are not part of a backbone (decoders, heads, mask tokens)."""
    missing: list[str] = field(default_factory=list)
    """Backbone keys of the timm model that the file does not provide."""
    unexpected: list[str] = field(default_factory=list)
    """Kept keys that the timm model does not have."""

    def report(self) -> str:
        """One line for logs: the format and what did not fit."""
        parts = [f"{self.format} weights for {self.model_name}: {len(self.state)} tensors"]
        for name in ("dropped", "missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                parts.append(
                    f"{len(keys)} {name} ({', '.join(keys[:4])}{', ...' * (len(keys) > 4)})"
                )
        return "; ".join(parts)


# ---------------------------------------------------------------- reading files


def read_tensors(path: Path) -> dict[str, Any]:
    """A safetensors file, or a torch file loaded weights-only. ValueError if neither."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many classes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot be loaded weights-only ({first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a state dict")
    return data


def _tensors(d: dict[str, Any]) -> State:
    return {k: v for k, v in d.items() if isinstance(v, Tensor)}


def _strip(state: State, prefixes: tuple[str, ...]) -> State:
    """Remove the first of ``prefixes`` that every key carries, repeatedly."""
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _is_timm_vit(state: State) -> bool:
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state)


# ---------------------------------------------------------------- architecture


def infer_vit(state: State) -> tuple[str, dict[str, Any]]:
    """(timm name, model_args) of the ViT that ``state`` (timm names) belongs to.

    Heads are not stored in weights: ``num_heads`` is ``embed_dim / 64``, as in every
    published ViT (tiny 3, small 6, base 12, large and huge 16).
    """
    proj = state["patch_embed.proj.weight"]
    dim, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    prefix = int("cls_token" in state) + (
        state["reg_token"].shape[1] if "reg_token" in state else 0
    )
    grid = math.isqrt(state["pos_embed"].shape[1] - prefix) if "pos_embed" in state else 14
    no_embed_class = "pos_embed" in state and grid * grid != state["pos_embed"].shape[1] - prefix
    if no_embed_class:  # DINOv2-style with registers: pos_embed holds patches only
        grid = math.isqrt(state["pos_embed"].shape[1])
    args: dict[str, Any] = {
        "img_size": grid * patch,
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": max(1, dim // 64),
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "class_token": "cls_token" in state,
    }
    if "blocks.0.ls1.gamma" in state:
        args["init_values"] = 1.0
    if "reg_token" in state:
        args["reg_tokens"] = state["reg_token"].shape[1]
        args["no_embed_class"] = True
    if "fc_norm.weight" in state:
        args["global_pool"] = "avg"
    size = _SIZES.get(dim, "base")
    if "init_values" in args:  # layer scale: DINOv2's family in timm
        regs = f"_reg{args['reg_tokens']}" if "reg_tokens" in args else ""
        return f"vit_{size}_patch14{regs}_dinov2", args
    return f"vit_{size}_patch16_224", args


def _check_against_timm(ext: ExternalWeights) -> None:
    """Fill ``missing``/``unexpected`` by comparing with the timm model's own keys (built on
    the meta device: no memory, no initialisation)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(ext.model_name, pretrained=False, num_classes=0, **ext.model_args)
    reference = set(model.state_dict())
    ext.missing = sorted(reference - set(ext.state))
    ext.unexpected = sorted(set(ext.state) - reference)


# ---------------------------------------------------------------- the formats


def _split_backbone(state: State, drop: Callable[[str], bool]) -> tuple[State, list[str]]:
    kept = {k: v for k, v in state.items() if not drop(k)}
    return kept, sorted(set(state) - set(kept))


_MAE_EXTRA = re.compile(r"^(decoder_|mask_token$|head\.)")


def from_mae(data: dict[str, Any]) -> tuple[State, list[str]]:
    """Official MAE (``main_pretrain.py``/``main_finetune.py``): ``{'model': timm names}``."""
    state = _strip(_tensors(data["model"]), ("module.",))
    return _split_backbone(state, lambda k: bool(_MAE_EXTRA.match(k)))


def from_dino(data: dict[str, Any], which: str = "teacher") -> tuple[State, list[str]]:
    """Official DINO ``checkpoint.pth``: ``teacher``/``student`` wrapping ``backbone.`` + ``head.``
    (the student also ``module.``, from DistributedDataParallel)."""
    state = _strip(_tensors(data[which]), ("module.",))
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    dropped = sorted(k for k in state if not k.startswith("backbone."))
    backbone, more = _split_backbone(backbone, lambda k: k == "mask_token" or k.startswith("head."))
    return backbone, dropped + more


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def from_transformers(state: State) -> tuple[State, list[str]]:
    """transformers' ``ViTModel``/``Dinov2Model`` names (as saved by ``save_pretrained`` and
    published on the Hub) -> timm's. Query, key and value are concatenated into ``qkv``."""
    state = _strip(state, ("vit.", "dinov2."))
    out: State = {}
    dropped: list[str] = []
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            dropped.append(key)  # pooler, classifier, mask_token
            continue
        layer, rest = int(match.group(1)), match.group(2)
        part, _, kind = rest.rpartition(".")
        if part.startswith("attention.attention."):
            qkv.setdefault((layer, kind), {})[part.rsplit(".", 1)[1]] = value
        elif part in _HF_BLOCK:
            out[f"blocks.{layer}.{_HF_BLOCK[part]}.{kind}"] = value
        elif rest in _HF_BLOCK:  # layer-scale parameters have no weight/bias suffix
            out[f"blocks.{layer}.{_HF_BLOCK[rest]}"] = value
        else:
            dropped.append(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer}: incomplete query/key/value {kind}s")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    return out, sorted(dropped)


def _transformers_args(config: dict[str, Any], state: State) -> tuple[str, dict[str, Any]]:
    name, args = infer_vit(state)
    args["num_heads"] = int(config.get("num_attention_heads", args["num_heads"]))
    if config.get("model_type") == "dinov2":
        args["init_values"] = float(config.get("layerscale_value", 1.0))
    return name, args


def _is_hf_dir(path: Path) -> bool:
    """A Hugging Face layout: a ``config.json`` of timm (``architecture``) or transformers
    (``model_type``) beside its weights."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and ("architecture" in config or "model_type" in config)


def _from_hf_dir(path: Path) -> ExternalWeights:
    config = json.loads((path / "config.json").read_text())
    weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise ValueError(f"{path}: config.json without {' or '.join(WEIGHT_FILES)}")
    state = _tensors(read_tensors(weights))
    if "architecture" in config:  # timm's layout: timm names, maybe with a classifier
        kept, dropped = _split_backbone(state, lambda k: k.startswith("head."))
        args = dict(config.get("model_args") or {})
        args.pop("num_classes", None)
        return ExternalWeights(kept, "hf-timm", config["architecture"], args, dropped)
    if config.get("model_type") in ("vit", "dinov2"):
        kept, dropped = from_transformers(state)
        name, args = _transformers_args(config, kept)
        return ExternalWeights(kept, "hf-transformers", name, args, dropped)
    raise ValueError(
        f"{path}: a Hugging Face model of type {config.get('model_type')!r};"
        " only timm models and transformers' vit/dinov2 are converted"
    )


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")
"""Files tried as weights; anything else (notes, images, configs) is not a weights format."""


def _from_file(path: Path, model_name: str | None) -> ExternalWeights | None:
    if path.suffix not in WEIGHT_SUFFIXES:
        return None
    data = read_tensors(path)
    if isinstance(data.get("teacher"), dict) and isinstance(data.get("student"), dict):
        state, dropped = from_dino(data)
        fmt = "dino"
    elif isinstance(data.get("model"), dict) and _is_timm_vit(
        _strip(_tensors(data["model"]), ("module.",))
    ):
        state, dropped = from_mae(data)
        fmt = "mae"
    else:
        inner = data.get("state_dict", data)
        state = _strip(_tensors(inner) if isinstance(inner, dict) else {}, ("module.", "model."))
        if not _is_timm_vit(state) and model_name is None:
            return None
        state, dropped = _split_backbone(state, lambda k: k.startswith("head."))
        fmt = "timm"
    if model_name is not None:
        return ExternalWeights(state, fmt, model_name, {}, dropped)
    if not _is_timm_vit(state):
        raise ValueError(f"{path}: {fmt} checkpoint without ViT backbone weights")
    name, args = infer_vit(state)
    return ExternalWeights(state, fmt, name, args, dropped)


def load_external(path: Path, *, model_name: str | None = None) -> ExternalWeights | None:
    """Weights in a published format -> timm ViT backbone weights with a key report.

    Returns None when ``path`` is in none of the formats above (a run directory, one of our
    checkpoints or exports: the caller's own resolver handles those). ``model_name`` (a timm
    architecture) is needed for a plain state dict of a non-ViT model, and otherwise
    overrides the architecture read off the shapes. Raises ValueError for a file that looks
    like one of these formats but is damaged, or cannot be read weights-only.
    """
    path = Path(path)
    if path.is_dir():
        if not _is_hf_dir(path):
            return None  # e.g. one of our run directories (its config.json is a run config)
        ext = _from_hf_dir(path)
    elif path.is_file():
        if path.with_suffix(".json").name == "encoder.json" and path.with_suffix(".json").is_file():
            return None  # the project's own export (encoder.safetensors + encoder.json)
        found = _from_file(path, model_name)
        if found is None:
            return None
        ext = found
    else:
        raise ValueError(f"{path}: no such file or directory")
    if model_name is not None:
        ext.model_name, ext.model_args = model_name, {}
    _check_against_timm(ext)
    return ext


def model_fields(ext: ExternalWeights) -> dict[str, Any]:
    """``model.name``/``img_size``/``patch_size`` that rebuild these weights' architecture
    (what a run config can say); ValueError when the weights need more (a non-standard width
    or depth), checked tensor by tensor against the timm model those fields build."""
    import timm

    fields: dict[str, Any] = {
        "name": ext.model_name,
        "img_size": _single(ext.model_args.get("img_size", 224)),
        "patch_size": _single(ext.model_args.get("patch_size", 16)),
    }
    with torch.device("meta"):
        model = timm.create_model(
            fields["name"],
            pretrained=False,
            num_classes=0,
            img_size=fields["img_size"],
            patch_size=fields["patch_size"],
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(
        k for k, v in ext.state.items() if shapes.get(k, tuple(v.shape)) != tuple(v.shape)
    )
    if wrong or set(shapes) != set(ext.state):
        first = wrong[0] if wrong else sorted(set(shapes) ^ set(ext.state))[0]
        raise ValueError(
            f"{ext.format} weights are not a {fields['name']} of image size {fields['img_size']}"
            f" and patch size {fields['patch_size']} (first difference: {first})"
        )
    return fields


def _single(size: Any) -> int:
    return int(size[0]) if isinstance(size, list | tuple) else int(size)


def build_model(ext: ExternalWeights, **overrides: Any) -> torch.nn.Module:
    """The timm model the weights fit, with them loaded (strict: every key must match)."""
    import timm

    model = timm.create_model(
        ext.model_name, pretrained=False, num_classes=0, **{**ext.model_args, **overrides}
    )
    model.load_state_dict(ext.state, strict=True)
    return model
