"""FP32 ONNX and TorchScript exports match PyTorch (ViT and MobileNetV3, tiny inputs)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from vitssl.models.vit import create_vit
from vitssl.train.edge.onnx_export import InferenceModel, export_onnx, export_torchscript


def _ort(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("arch", ["vit", "mobilenetv3"])
def test_onnx_fp32_matches_pytorch_with_dynamic_batch(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "vit":
        backbone = create_vit("vit_tiny_patch16_224", 32, 8)
        backbone.blocks = backbone.blocks[:2]
    else:
        backbone = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    model = InferenceModel(backbone)
    res = export_onnx(model, tmp_path / "m.onnx", 32, exporter="torchscript")
    assert res.exporter == "torchscript" and res.max_abs_diff < 1e-4
    for batch in (1, 5):  # export used batch 2: the axis must be dynamic
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = model(x).numpy()
            if arch == "vit":  # independent: the class token of timm's own forward
                np.testing.assert_allclose(ref, backbone(x).numpy(), atol=1e-5)
        got = _ort(tmp_path / "m.onnx", x.numpy())
        assert (
            got.shape
            == ref.shape
            == (batch, getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        )
        assert np.abs(got - ref).max() < 1e-4
    ts = export_torchscript(model, tmp_path / "m.pt", 32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts))(x), model(x), atol=1e-5)


def test_onnx_check_refuses_a_wrong_export(tmp_path):
    from vitssl.train.edge.onnx_export import check_onnx

    model = InferenceModel(timm.create_model("mobilenetv3_small_050", num_classes=0))
    export_onnx(model, tmp_path / "m.onnx", 32, exporter="torchscript", check=False)
    other = InferenceModel(timm.create_model("mobilenetv3_small_050", num_classes=0))
    with pytest.raises(ValueError, match="differs from PyTorch"):
        check_onnx(other, tmp_path / "m.onnx", 32)


def test_fp32_check_tolerance_follows_the_output_scale(tmp_path):
    """Outputs that reach 30 (the demo student) carry float rounding of ~3e-4: accepted
    relative to the scale, while a wrong model is still refused."""
    import numpy as np

    from vitssl.train.edge.onnx_export import check_onnx, tolerance

    assert tolerance(np.array([[-30.0, 2.0]]), 1e-4) == pytest.approx(3e-3)
    assert tolerance(np.array([[0.01]]), 1e-4) == pytest.approx(1e-4)  # scale at least 1
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    net(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        net[2].weight.mul_(1e5)  # outputs of ~1e4: absolute rounding differences above 1e-4
    model = InferenceModel(net)
    res = export_onnx(model, tmp_path / "big.onnx", 32, exporter="torchscript")
    with torch.no_grad():
        scale = float(model(torch.randn(3, 3, 32, 32)).abs().max())
    assert res.max_abs_diff < 1e-4 * scale
    with pytest.raises(ValueError, match="differs from PyTorch"):
        check_onnx(model, tmp_path / "big.onnx", 32, rtol=1e-12)
