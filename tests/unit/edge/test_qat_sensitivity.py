"""Fake-quant modules, the QAT loop and the sensitivity scan on the toy model."""

from __future__ import annotations

import torch
from torch import nn

from vitssl.models import fake_quant
from vitssl.train.edge import qat
from vitssl.train.edge.data import load_images
from vitssl.train.edge.onnx_export import export_onnx
from vitssl.train.edge.sensitivity import scan, write_report


def test_fake_quant_weight_is_per_channel_symmetric_int8():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 1.0, 10.0, 0.01]).view(4, 1, 1, 1)
    q = fake_quant.fake_quant_weight(w)
    scale = w.abs().flatten(1).amax(1) / 127  # independent: max |w| per output channel
    codes = q / scale.view(4, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert ((q - w).abs() <= scale.view(4, 1, 1, 1) / 2 + 1e-7).all()


def test_prepare_and_strip_keep_parameter_names():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    m(torch.randn(1, 3, 8, 8))
    names = list(m.state_dict())
    fake_quant.prepare(m)
    assert type(m[0]) is fake_quant.FakeQuantConv2d and list(m.state_dict()) == names
    m(torch.randn(2, 3, 8, 8))
    fake_quant.strip(m)
    assert type(m[0]) is nn.Conv2d and list(m.state_dict()) == names


def test_qat_finetune_returns_a_float_model(toy_data, toy_model):
    train = load_images(toy_data["train"], 32, limit=64)
    tuned, losses = qat.qat_finetune(
        toy_model, train.images, labels=train.labels, kind="logits", steps=3, batch_size=16
    )
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not any(
        isinstance(m, (fake_quant.FakeQuantConv2d, fake_quant.FakeQuantLinear))
        for m in tuned.modules()
    )
    assert set(tuned.state_dict()) == set(toy_model.state_dict())


def test_sensitivity_scan_ranks_nodes(toy_data, toy_model, tmp_path):
    fp32 = export_onnx(toy_model, tmp_path / "m.onnx", 32, exporter="torchscript").path
    imgs = load_images(toy_data["val"], 32, limit=32).images
    res = scan(fp32, imgs[:16], imgs, "logits", max_nodes=2)
    assert res["num_nodes"] == 2 and len(res["nodes"]) == 2
    gains = [r["excluded_gain"] for r in res["nodes"]]
    assert gains == sorted(gains, reverse=True)
    for r in res["nodes"]:
        assert 0 <= r["alone_cost"] < 0.5 and 0 <= r["alone"]["agreement"] <= 100
    js, md = write_report(res, tmp_path)
    assert js.is_file() and "| 1 |" in md.read_text()


def test_qat_method_trains_a_fake_quant_copy_against_a_frozen_outside_teacher():
    """vitssl.models.methods.qat: the FP32 teacher is not a submodule (no optimizer, no ZeRO-3
    partitioning, not in checkpoints) and stays bit-identical; the loss is 1 - cos."""
    import torch.nn.functional as F

    from vitssl.models.backbones import create_backbone, embed
    from vitssl.models.fake_quant import FakeQuantConv2d
    from vitssl.models.methods.qat import QATConfig, QATMethod
    from vitssl.train.config import ModelSection

    torch.manual_seed(0)
    cfg = ModelSection(name="vit_tiny_patch16_224", img_size=16, patch_size=4)
    method = QATMethod(QATConfig(init="random"), create_backbone(cfg)).train()
    names = [n for n, _ in method.named_parameters()]
    assert names and all(n.startswith("backbone.") for n in names)
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert any(isinstance(m, FakeQuantConv2d) for m in method.backbone.modules())
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    out = method({"views": [x]})
    with torch.no_grad():  # independent: 1 - mean cosine of the two encoders' class tokens
        ref = 1 - F.cosine_similarity(embed(method.backbone, x), embed(method.teacher, x)).mean()
    assert torch.allclose(out["loss"], ref, atol=1e-6)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    out["loss"].backward()
    opt.step()
    after = method.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    method.to(torch.bfloat16)  # what DeepSpeed's bf16 does: the teacher is not cast
    assert all(t.dtype == torch.float32 for t in method.teacher.state_dict().values())
    low = method({"views": [x.bfloat16()]})["loss"]  # bf16 inputs: the teacher autocasts
    assert torch.isfinite(low)


def test_qat_and_export_run_on_a_frozen_checkpoint_loaded_encoder(toy_data, tmp_path):
    """The loader freezes what it loads (requires_grad=False); QAT must still train it and
    the export must accept its FP32 graph (the demo-full failure: an empty optimizer)."""
    import json

    from safetensors.torch import save_file

    from vitssl.models.backbones import create_backbone
    from vitssl.train.config import ModelSection
    from vitssl.train.edge.onnx_export import load_inference_model

    arch = ModelSection(name="mobilenetv3_small_050", img_size=32, cifar_stem=True)
    torch.manual_seed(0)
    save_file(create_backbone(arch).state_dict(), str(tmp_path / "encoder.safetensors"))
    (tmp_path / "encoder.json").write_text(
        json.dumps({"timm_name": arch.name, "cifar_stem": True, "kwargs": {"img_size": 32}})
    )
    model, size = load_inference_model(str(tmp_path / "encoder.safetensors"), pool="avg")
    assert size == 32 and not any(p.requires_grad for p in model.parameters())
    images = load_images(toy_data["train"], 32, limit=32).images
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, losses = qat.qat_finetune(model, images, kind="embedding", steps=3, batch_size=8)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)  # the frozen encoder was trained
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    onnx_file = export_onnx(tuned, tmp_path / "qat.onnx", 32, exporter="torchscript")
    assert onnx_file.max_abs_diff < 1e-3
