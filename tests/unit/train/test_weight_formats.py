"""Published weight formats converted to timm give the features of the model they came from.

Files are written as the official code names their keys: MAE's ``{'model': ...}`` with its
decoder, DINO's ``teacher``/``student`` with ``module.backbone.``/``backbone.`` prefixes and its
projection head, and transformers' own ``save_pretrained`` for ViTModel and Dinov2Model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitssl.train.weight_formats import build_model, load_external, model_fields

KW = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)  # head dim 64


def tiny_vit(seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, **KW, **extra
    )
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped key shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def features(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images(size))


def test_official_mae_checkpoint(tmp_path: Path) -> None:
    source = tiny_vit()
    state = dict(source.state_dict())
    decoder = {  # names of MAE's models_mae.MaskedAutoencoderViT
        "mask_token": torch.zeros(1, 1, 64),
        "decoder_embed.weight": torch.randn(64, 128),
        "decoder_pos_embed": torch.zeros(1, 17, 64),
        "decoder_blocks.0.norm1.weight": torch.ones(64),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(192, 64),
        "decoder_norm.weight": torch.ones(64),
        "decoder_pred.weight": torch.randn(192, 64),
    }
    torch.save({"model": {**state, **decoder}}, tmp_path / "mae_pretrain_vit_tiny.pth")
    ext = load_external(tmp_path / "mae_pretrain_vit_tiny.pth")
    assert ext is not None and ext.format == "mae"
    assert ext.dropped == sorted(decoder) and ext.missing == [] and ext.unexpected == []
    assert ext.model_args["embed_dim"] == 128 and ext.model_args["depth"] == 2
    assert torch.equal(features(build_model(ext)), features(source))


def test_official_dino_checkpoint_takes_the_teacher(tmp_path: Path) -> None:
    teacher, student = tiny_vit(seed=1), tiny_vit(seed=2)
    head = {"head.mlp.0.weight": torch.randn(256, 128), "head.last_layer.weight_g": torch.ones(1)}
    checkpoint = {  # main_dino.py: the student is DDP-wrapped, the teacher is not
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            **{f"module.{k}": v for k, v in head.items()},
        },
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            **head,
        },
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8),
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    ext = load_external(tmp_path / "checkpoint.pth")
    assert ext is not None and ext.format == "dino"
    assert ext.dropped == sorted(head) and ext.missing == [] and ext.unexpected == []
    got = features(build_model(ext))
    assert torch.equal(got, features(teacher)) and not torch.equal(got, features(student))


def test_timm_name_with_a_local_weights_file_and_the_key_report(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    state = dict(source.state_dict())
    save_file(state, str(tmp_path / "w.safetensors"))
    ext = load_external(tmp_path / "w.safetensors", model_name="vit_tiny_patch16_224")
    assert ext is not None and ext.format == "timm" and ext.model_args == {}
    assert ext.dropped == ["head.bias", "head.weight"]
    model = build_model(ext)
    assert torch.equal(features(model, 224), features(source, 224))
    # wrapped the way training scripts save ({'state_dict': {'module.' ...}}), with damage
    state.pop("norm.bias")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    wrapped["state_dict"]["module.extra.weight"] = torch.ones(1)
    torch.save(wrapped, tmp_path / "w.pth")
    ext = load_external(tmp_path / "w.pth", model_name="vit_tiny_patch16_224")
    assert ext is not None and ext.missing == ["norm.bias"] and ext.unexpected == ["extra.weight"]
    assert "1 missing (norm.bias)" in ext.report()


def _save_transformers(model, config, tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    model.save_pretrained(out)  # writes config.json + model.safetensors with the Hub's names
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    return out


def test_transformers_vit_model_directory(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="needs transformers (extra 'test')")
    config = transformers.ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
        image_size=32, patch_size=8, layer_norm_eps=1e-6, add_pooling_layer=True,
    )  # fmt: skip
    torch.manual_seed(4)
    hf = transformers.ViTModel(config).eval()
    ext = load_external(_save_transformers(hf, config, tmp_path))
    assert ext is not None and ext.format == "hf-transformers"
    assert ext.missing == [] and ext.unexpected == []
    assert ext.dropped == ["pooler.dense.bias", "pooler.dense.weight"]
    with torch.no_grad():
        expected = hf(pixel_values=images()).last_hidden_state
    torch.testing.assert_close(features(build_model(ext)), expected, rtol=1e-5, atol=1e-5)


def test_transformers_dinov2_model_directory(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="needs transformers (extra 'test')")
    config = transformers.Dinov2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, layerscale_value=0.5,
    )  # fmt: skip
    torch.manual_seed(5)
    hf = transformers.Dinov2Model(config).eval()
    ext = load_external(_save_transformers(hf, config, tmp_path))
    assert ext is not None and ext.missing == [] and ext.unexpected == []
    assert ext.dropped == ["embeddings.mask_token"]
    with torch.no_grad():
        expected = hf(pixel_values=images()).last_hidden_state
    torch.testing.assert_close(features(build_model(ext)), expected, rtol=1e-5, atol=1e-5)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_pickled_code_is_refused_and_other_files_are_not_external(tmp_path: Path) -> None:
    torch.save({"model": _Boom()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_external(tmp_path / "evil.pth")
    save_file({"fc.weight": torch.ones(2, 2)}, str(tmp_path / "other.safetensors"))
    assert load_external(tmp_path / "other.safetensors") is None
    (tmp_path / "run").mkdir()
    assert load_external(tmp_path / "run") is None
    with pytest.raises(ValueError, match="no such file"):
        load_external(tmp_path / "nope.pth")


def test_model_fields_name_a_standard_architecture_and_refuse_others(tmp_path: Path) -> None:
    torch.manual_seed(6)
    standard = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8
    )
    torch.save({"model": standard.state_dict()}, tmp_path / "mae.pth")
    ext = load_external(tmp_path / "mae.pth")
    assert ext is not None
    fields = model_fields(ext)
    assert fields == {"name": "vit_small_patch16_224", "img_size": 64, "patch_size": 8}
    rebuilt = timm.create_model(fields.pop("name"), num_classes=0, **fields)
    rebuilt.load_state_dict(ext.state)  # strict: the config's fields are enough
    torch.save({"model": tiny_vit().state_dict()}, tmp_path / "odd.pth")  # width 128: no name
    odd = load_external(tmp_path / "odd.pth")
    assert odd is not None
    with pytest.raises(ValueError, match="not a vit_base_patch16_224"):
        model_fields(odd)


def test_resolver_takes_official_checkpoints_for_init_teacher_and_evaluation(
    tmp_path: Path,
) -> None:
    """``method.init=``/``method.teacher=``/``encoder.checkpoint=`` go through
    ``vitssl.train.weights.resolve_weights``, which hands unknown files to these converters."""
    from vitssl.train.config import ModelSection
    from vitssl.train.weights import resolve_weights

    torch.manual_seed(5)
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8
    ).eval()
    torch.save({"model": dict(source.state_dict())}, tmp_path / "mae.pth")
    weights = resolve_weights(tmp_path / "mae.pth")
    assert weights.kind == "mae" and weights.arch.name == "vit_tiny_patch16_224"
    assert (weights.arch.img_size, weights.arch.patch_size) == (32, 8)
    assert torch.equal(features(weights.build().eval()), features(source))
    wrong = ModelSection(name="vit_tiny_patch16_224", img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="patch_size"):
        resolve_weights(tmp_path / "mae.pth", expect=wrong)


def test_model_init_starts_mae_from_an_official_checkpoint(tmp_path: Path) -> None:
    """``model.init=<official MAE file>``: the pretraining backbone starts from those weights
    (the same features as the source model), and methods with a teacher refuse it."""
    from vitssl.models.registry import create_method
    from vitssl.train.config import ConfigError, config_from_dict
    from vitssl.train.weights import init_backbone

    torch.manual_seed(6)
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8
    ).eval()
    torch.save({"model": dict(source.state_dict())}, tmp_path / "mae.pth")
    model = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8}
    cfg = config_from_dict(
        {"model": {**model, "init": str(tmp_path / "mae.pth")}, "train": {"steps": 1}}
    )
    method = create_method(cfg.method, cfg.model)
    assert not torch.equal(features(method.backbone.eval()), features(source))  # random init
    init_backbone(method.backbone, cfg.model)
    assert torch.equal(features(method.backbone.eval()), features(source))
    with pytest.raises(ConfigError, match=r"model\.init"):
        config_from_dict(
            {
                "model": {**model, "init": str(tmp_path / "mae.pth")},
                "method": {"name": "byol"},
                "train": {"steps": 1},
            }
        )
