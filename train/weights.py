"""Any weights a user names -> a backbone state dict and its architecture, weights-only.

The one place where files become :class:`models.pretrained.PretrainedWeights`; evaluation,
distillation teachers, fine-tune and QAT inits, export and ONNX all come through here.
Accepted, in this order (:func:`resolve_weights`):

* a checkpoint directory, or a run directory (its latest complete checkpoint): the ZeRO
  partitions are consolidated in memory (:func:`consolidated_state_dict`) and the
  ``backbone.*`` weights kept (the EMA teacher's with ``method.export_teacher``); the
  architecture is the run's saved ``model`` config;
* an exported ``encoder.safetensors`` with its ``encoder.json`` (or the ``export/``
  directory holding them);
* a plain state dict file (``.safetensors``, or ``.pt``/``.pth``/``.bin`` holding only
  named tensors) in timm names, of the architecture the caller expects;
* anything else falls through to :func:`external_weights` (other projects' formats), and
  then to a one-line "unknown weights format" error.

Nothing is unpickled beyond tensors: torch files go through
``vitssl.train.checkpoint.load_weights_only``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vitssl.models.pretrained import PretrainedWeights, load_strict
from vitssl.train.checkpoint import (
    MARKER,
    CheckpointFileError,
    latest_complete,
    load_weights_only,
    model_states_file,
    read_meta,
    verify_weights_only,
    weights_only_torch_load,
)
from vitssl.train.config import ConfigError, ModelSection, build_dataclass

log = logging.getLogger(__name__)

PREFIX = "backbone."
TEACHER_PREFIX = "teacher.backbone."
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

__all__ = ["PretrainedWeights", "load_strict", "method_weights", "resolve_weights"]


# ---------------------------------------------------------------- DeepSpeed checkpoints


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the latest complete one of a run directory."""
    if (path / MARKER).is_file():
        return path
    found = latest_complete(path / "checkpoints")
    if found is None:
        raise ValueError(f"{path}: not a complete checkpoint nor a run directory with one")
    return found


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage, weights-only.

    With ZeRO partitions, DeepSpeed's ``zero_to_fp32`` merges them. It asks ``torch.load``
    to unpickle in full, so it runs under ``weights_only_torch_load``; every file is also
    checked first (``verify_weights_only``), and a file holding anything but tensors is
    refused with one line.
    """
    verify_weights_only(ckpt)
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with weights_only_torch_load():
                merged = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        except CheckpointFileError:
            raise
        except (ValueError, KeyError):
            merged = {}  # stage 0 without partitioned optimizer: the module states hold it all
    else:
        merged = {}
    state = load_weights_only(model_states_file(ckpt))
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ValueError(f"{ckpt}: the model states hold no 'module' state dict")
    # Frozen parameters (MAE's fixed sin-cos positions) live outside the optimizer's fp32
    # partitions; ZeRO-1/2 checkpoints without frozen_param_shapes leave them out of the merge,
    # and the module states (whole at stages 0-2) still hold them.
    for k, v in module.items():
        if k not in merged and torch.is_tensor(v) and v.numel() > 0:
            merged[k] = v
    return {k: v.float() for k, v in merged.items()}


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


# ---------------------------------------------------------------- architectures


def model_config(raw: dict[str, Any]) -> ModelSection:
    """The ``model`` table of a saved config, for inference (no drop path, no checkpointing)."""
    try:
        cfg = build_dataclass(ModelSection, dict(raw), "model")
    except ConfigError as e:
        raise ValueError(f"saved model config: {e}") from None
    cfg.drop_path_rate = 0.0
    cfg.grad_checkpointing = False
    return cfg


def check_arch(arch: ModelSection, expect: Any, source: str, what: str = "") -> None:
    """Refuse weights of another architecture than ``expect`` (name, img_size, patch_size)."""
    for key in ("name", "img_size", "patch_size"):
        if getattr(arch, key) != getattr(expect, key):
            raise ValueError(
                f"{what or 'checkpoint'} {source} does not match the architecture: {key}="
                f"{getattr(arch, key)!r} there, model.{key}={getattr(expect, key)!r} expected"
            )


# ---------------------------------------------------------------- the resolver


def _export_file(path: Path) -> Path | None:
    """``encoder.safetensors`` named directly or held by ``path`` / ``path/export``."""
    if path.is_file() and path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return path
    if path.is_dir() and not (path / "checkpoints").is_dir():
        for cand in (path / "encoder.safetensors", path / "export" / "encoder.safetensors"):
            if cand.is_file():
                return cand
    return None


def _from_checkpoint(path: Path, expect: Any | None) -> PretrainedWeights:
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    arch = model_config(meta["config"]["model"])
    if expect is not None:  # before reading any weights
        check_arch(arch, expect, str(ckpt))
    full = consolidated_state_dict(ckpt)
    method = meta["config"]["method"]
    weights = PretrainedWeights(
        encoder_state(ckpt, full),
        arch,
        str(ckpt),
        "checkpoint",
        info={"step": meta.get("step"), "method": method["name"]},
    )
    if "head.weight" in full and "head.bias" in full:  # a fine-tuning run's classifier
        weights.head = {"weight": full["head.weight"], "bias": full["head.bias"]}
        weights.head_pool = method.get("global_pool", "cls")
    return weights


def _from_export(weights: Path, img_size: int, patch_size: int) -> PretrainedWeights:
    import json

    meta_file = weights.with_suffix(".json")
    if not meta_file.is_file():
        raise ValueError(f"{weights}: missing {meta_file.name} beside it")
    meta = json.loads(meta_file.read_text())
    kwargs = meta.get("kwargs", {})
    raw = {
        "name": meta["timm_name"],
        "cifar_stem": bool(meta.get("cifar_stem", False)),
        "img_size": kwargs.get("img_size", img_size),
        "patch_size": kwargs.get("patch_size", patch_size),
    }
    info = {k: meta[k] for k in ("step", "method") if k in meta}
    state = read_state_dict(weights)
    if state is None:
        raise ValueError(f"{weights} does not hold a flat state dict")
    return PretrainedWeights(state, model_config(raw), str(weights), "export", info=info)


def read_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """A flat ``{name: tensor}`` file (safetensors, or a torch file read weights-only);
    None when the file holds something else (nested checkpoints of other projects)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} could not be read as safetensors: {e}") from None
    state = load_weights_only(path)
    if (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    ):
        return state
    return None


def external_weights(path: Path, expect: Any | None) -> PretrainedWeights | None:
    """Formats of other projects, converted to timm names: the place where converters
    (``train/weight_formats.py``: official MAE ``{'model': ...}``, DINO ``teacher`` /
    ``student`` with ``backbone.`` prefixes, Hugging Face directories, a timm name with a
    local file) plug in. None when no converter recognises ``path``. Weights that do not
    fit the architecture their shapes name (missing or unexpected keys) are refused."""
    from vitssl.train.weight_formats import load_external, model_fields

    ext = load_external(path)
    if ext is None:
        return None
    if ext.missing or ext.unexpected:
        raise ValueError(f"{path}: {ext.report()}")
    log.info(ext.report())
    return PretrainedWeights(ext.state, model_config(model_fields(ext)), str(path), ext.format)


def resolve_weights(
    spec: str | Path,
    expect: Any | None = None,
    img_size: int = 32,
    patch_size: int = 4,
) -> PretrainedWeights:
    """The backbone weights and architecture that ``spec`` names (see the module docstring).

    ``expect``: the architecture the caller needs; weights of another one are refused, and a
    plain state dict file (which carries no architecture) is taken to be of it.
    ``img_size`` / ``patch_size``: defaults for an export whose ``encoder.json`` lacks them.
    """
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"checkpoint {str(spec)!r} does not exist")
    weights: PretrainedWeights | None
    export = _export_file(path)
    if export is not None:
        weights = _from_export(export, img_size, patch_size)
    elif path.is_dir() and ((path / MARKER).is_file() or (path / "checkpoints").is_dir()):
        weights = _from_checkpoint(path, expect)
    else:
        weights = _from_state_dict_file(path, expect)
        if weights is None:
            # ---- unrecognised inputs: other projects' formats (train/weight_formats.py) ----
            weights = external_weights(path, expect)
        if weights is None:
            raise ValueError(
                f"{path}: unknown weights format (expected a run or checkpoint directory, "
                "an exported encoder.safetensors, or a state dict file)"
            )
    if expect is not None:
        check_arch(weights.arch, expect, weights.source)
    return weights


def _from_state_dict_file(path: Path, expect: Any | None) -> PretrainedWeights | None:
    if not (path.is_file() and path.suffix in STATE_DICT_SUFFIXES):
        return None
    state = read_state_dict(path)
    if state is None:
        return None
    if expect is None:
        raise ValueError(f"{path} is a plain state dict: its architecture comes from model.*")
    arch = model_config({k: getattr(expect, k) for k in ("name", "img_size", "patch_size")})
    arch.cifar_stem = bool(getattr(expect, "cifar_stem", False))
    state = {k: v.float() for k, v in state.items()}
    return PretrainedWeights(state, arch, str(path), "state_dict")


def method_weights(method_cfg: Any, model_cfg: Any) -> dict[str, PretrainedWeights]:
    """The weights a method's config names (its ``weight_fields``), resolved for
    ``create_method``. A fine-tune or QAT init must fit ``model``; a teacher brings its own
    architecture."""
    out: dict[str, PretrainedWeights] = {}
    for name, fits_model in type(method_cfg).weight_fields.items():
        spec = getattr(method_cfg, name)
        if spec:
            expect = model_cfg if fits_model else None
            out[name] = resolve_weights(spec, expect, model_cfg.img_size, model_cfg.patch_size)
    return out


def load_teacher(spec: str, pool: str = "cls") -> Any:
    """A distillation teacher (``vitssl.models.methods.distil.FrozenTeacher``) from any weights."""
    from vitssl.models.methods.distil import frozen_teacher

    return frozen_teacher(resolve_weights(spec), pool)


def init_backbone(backbone: torch.nn.Module, model_cfg: ModelSection) -> None:
    """``model.init``: load the weights it names (anything :func:`resolve_weights` takes,
    published formats included) into ``backbone``; they must fit ``model``. A no-op for "".
    """
    if not model_cfg.init:
        return
    weights = resolve_weights(model_cfg.init, expect=model_cfg)
    weights.load_into(backbone)
    log.info(f"model.init: {weights.kind} weights from {weights.source}")
