"""vitssl.train.weights: every kind of user weights resolves to a backbone state dict and its
architecture, weights-only; anything else is one line."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitssl.models.backbones import create_backbone
from vitssl.train.checkpoint import (
    CheckpointFileError,
    load_weights_only,
    weights_only_torch_load,
)
from vitssl.train.config import ModelSection
from vitssl.train.weights import method_weights, resolve_weights

ARCH = ModelSection(name="vit_tiny_patch16_224", img_size=32, patch_size=8)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in create_backbone(ARCH).state_dict().items()}


def _export(out: Path, state: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "encoder.safetensors"))
    kwargs = {"img_size": 32, "patch_size": 8, "num_classes": 0}
    spec = {"timm_name": ARCH.name, "kwargs": kwargs, "method": "mae", "step": 7}
    (out / "encoder.json").write_text(json.dumps(spec))
    return out / "encoder.safetensors"


def test_export_file_and_directory_resolve_to_the_same_weights(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    weights = _export(tmp_path / "export", state)
    for spec in (weights, weights.parent):
        got = resolve_weights(spec)
        assert got.kind == "export" and got.source == str(weights)
        assert (got.arch.name, got.arch.img_size, got.arch.patch_size) == (ARCH.name, 32, 8)
        assert got.info == {"step": 7, "method": "mae"}
        assert all(torch.equal(got.state[k], v) for k, v in state.items())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_plain_state_dict_takes_the_callers_architecture(
    tmp_path: Path, state: dict[str, torch.Tensor], suffix: str
) -> None:
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    got = resolve_weights(path, expect=ARCH)
    assert got.kind == "state_dict" and got.arch.patch_size == 8
    model = got.build()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="plain state dict: its architecture comes from model"):
        resolve_weights(path)
    other = ModelSection(name=ARCH.name, img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="does not match the architecture") as e:
        resolve_weights(path, expect=other).build()
    assert "\n" not in str(e.value)


def test_pickle_payload_in_a_state_dict_file_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"w": Payload()}, path)
    with pytest.raises(ValueError) as e:
        resolve_weights(path, expect=ARCH)
    assert str(e.value) == f"{path} is not a weights-only checkpoint (refusing to unpickle io.open)"
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        load_weights_only(path, mmap=True)
    assert not marker.exists()


def test_unknown_inputs_fall_through_to_one_line(tmp_path: Path) -> None:
    nested = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, nested)  # a format to convert
    (tmp_path / "empty").mkdir()
    for spec in (nested, tmp_path / "empty", tmp_path / "notes.txt"):
        if spec.suffix == ".txt":
            spec.write_text("hello")
        with pytest.raises(ValueError, match="unknown weights format") as e:
            resolve_weights(spec, expect=ARCH)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_weights(tmp_path / "nope")


def test_method_weights_resolves_only_declared_non_empty_fields(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    from vitssl.models.methods.finetune import FinetuneConfig
    from vitssl.models.registry import create_method

    weights = _export(tmp_path / "export", state)
    assert method_weights(FinetuneConfig(init=""), ARCH) == {}
    cfg = FinetuneConfig(init=str(weights))
    resolved = method_weights(cfg, ARCH)
    assert set(resolved) == {"init"}
    method = create_method(cfg, ARCH, resolved)
    assert torch.equal(method.backbone.state_dict()["cls_token"], state["cls_token"])
    with pytest.raises(ValueError, match=r"method.init=.* was not resolved"):
        create_method(cfg, ARCH)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker exists iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_weights_only_torch_load_overrides_weights_only_false_and_restores(
    tmp_path: Path,
) -> None:
    """Inside the block, torch.load(..., weights_only=False) of a path or a file object
    refuses a pickle payload; tensors still load; torch.load is the original again after."""
    original = torch.load
    marker = tmp_path / "code_ran"
    evil, good = tmp_path / "evil.pt", tmp_path / "good.pt"
    torch.save({"x": _Payload(marker)}, evil)
    torch.save({"x": torch.arange(3)}, good)
    with weights_only_torch_load():
        assert torch.load is not original
        with pytest.raises(CheckpointFileError, match=r"refusing to unpickle io\.open"):
            torch.load(evil, map_location="cpu", weights_only=False)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(io.BytesIO(evil.read_bytes()), weights_only=False)
        loaded = torch.load(str(good), weights_only=False)
        assert torch.equal(loaded["x"], torch.arange(3))
    assert torch.load is original
    assert not marker.exists(), "the payload ran"
