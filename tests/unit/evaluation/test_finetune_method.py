"""The finetune method: MAE's layer-wise decay, freeze schedule, loss, label checks."""

from __future__ import annotations

import pytest
import torch

from tests.unit.evaluation.conftest import TINY_VIT
from vitssl.models.backbones import embed
from vitssl.models.methods.base import StepContext
from vitssl.models.methods.finetune import Finetune, FinetuneConfig, build_finetune
from vitssl.train.config import ConfigError, ModelSection, build_dataclass
from vitssl.train.edge.onnx_export import InferenceModel


def mae_lrd_scale(name: str, num_layers: int, decay: float) -> float:
    """MAE's util/lr_decay.py (param_groups_lrd + get_layer_id_for_vit) on timm names."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        layer = 0
    elif name.startswith("blocks"):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = num_layers
    return decay ** (num_layers - layer)


def _method(**kw: object) -> Finetune:
    cfg = FinetuneConfig(num_classes=10, **kw)  # type: ignore[arg-type]
    return build_finetune(cfg, ModelSection(**TINY_VIT))  # type: ignore[arg-type]


def test_layer_decay_matches_mae() -> None:
    m = _method(layer_decay=0.6)
    groups = m.param_groups(0.05)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    nblocks = len(m.backbone.blocks)
    for name, p in m.backbone.named_parameters():
        if p.requires_grad:
            assert scale[id(p)] == pytest.approx(mae_lrd_scale(name, nblocks + 1, 0.6)), name
    assert all(scale[id(p)] == 1.0 for p in m.head.parameters())
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(m.head.weight)] == 0.05 and decay[id(m.head.bias)] == 0.0
    assert decay[id(m.backbone.cls_token)] == 0.0


def test_freeze_then_unfreeze_last_blocks() -> None:
    m = _method(freeze_epochs=1.0, unfreeze_blocks=2, unfreeze_lr_scale=0.5, layer_decay=1.0)
    groups = m.param_groups(0.0)
    early, late = StepContext(5, 100, 10), StepContext(10, 100, 10)
    for g in groups:
        lid = g["layer_id"]
        if g["is_head"]:
            assert m.lr_scale(g, early) == m.lr_scale(g, late) == 1.0
        elif lid in (11, 12):  # the last two blocks
            assert m.lr_scale(g, early) == 0.0 and m.lr_scale(g, late) == 0.5
        elif lid < 11:
            assert m.lr_scale(g, early) == m.lr_scale(g, late) == 0.0


def test_forward_with_mixup_and_plain() -> None:
    torch.manual_seed(0)
    imgs, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 1])
    for kw in (
        {},
        {"mixup": 0.0, "cutmix": 0.0},
        {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
    ):
        out = _method(**kw)({"views": [imgs], "label": labels})
        assert torch.isfinite(out["loss"]) and out["loss"] > 0
    m = _method(mixup=0.0, cutmix=0.0, label_smoothing=0.0).eval()
    ref = torch.nn.functional.cross_entropy(m.logits(imgs), labels)
    torch.testing.assert_close(m({"views": [imgs], "label": labels})["loss"], ref)


def test_label_too_large_is_refused() -> None:
    with pytest.raises(ValueError, match="num_classes=10"):
        _method()({"views": [torch.randn(2, 3, 32, 32)], "label": torch.tensor([1, 10])})


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="layer_decay"):
        build_dataclass(FinetuneConfig, {"layer_decay": 1.5}, "method")
    with pytest.raises(ConfigError, match="unknown key"):
        build_dataclass(FinetuneConfig, {"mixupp": 0.1}, "method")


def test_avg_pool_head_is_timms_fc_norm_head() -> None:
    """Same weights in timm's VisionTransformer(global_pool='avg') (which drops the final
    norm and normalises the mean of the patch tokens with a new fc_norm, as MAE's
    models_vit.py does): identical logits. Normalise-then-average differs."""
    import timm

    torch.manual_seed(0)
    method = _method(global_pool="avg").eval()
    ref = timm.create_model(
        TINY_VIT["name"], img_size=32, patch_size=8, num_classes=10, global_pool="avg"
    ).eval()
    state = {k[len("backbone.") :]: v for k, v in method.state_dict().items() if "backbone." in k}
    with torch.no_grad():
        method.fc_norm.weight.normal_()  # type: ignore[union-attr]
        method.head.weight.normal_()
    state.update({f"fc_norm.{k}": v for k, v in method.fc_norm.state_dict().items()})  # type: ignore[union-attr]
    state.update({f"head.{k}": v for k, v in method.head.state_dict().items()})
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.logits(x), ref(x), rtol=1e-5, atol=1e-5)
        # the encoder's features (k-NN, probes, the ONNX export) are timm's pre-logits:
        # the mean of the patch tokens through fc_norm, not the un-normalised mean
        pre_logits = ref.forward_head(ref.forward_features(x), pre_logits=True)
        torch.testing.assert_close(
            embed(method.backbone, x, "avg"), pre_logits, rtol=1e-5, atol=1e-5
        )
        exported = InferenceModel(method.backbone, method.head, pool="avg")
        torch.testing.assert_close(exported(x), ref(x), rtol=1e-5, atol=1e-5)


def test_position_embedding_is_trained_with_layer_decay_and_no_weight_decay() -> None:
    method = _method(layer_decay=0.5)
    assert method.backbone.pos_embed.requires_grad  # type: ignore[union-attr]
    groups = method.param_groups(0.05)
    pos = method.backbone.pos_embed  # type: ignore[union-attr]
    (group,) = [g for g in groups if any(p is pos for p in g["params"])]
    assert group["weight_decay"] == 0.0
    assert group["lr_scale"] == pytest.approx(mae_lrd_scale("pos_embed", 12 + 1, 0.5))
