"""Second INT8 backend: PT2E (``torch.export`` + torchao's ``prepare_pt2e`` / ``convert_pt2e``)
with torchao's ``X86InductorQuantizer`` (per-channel symmetric int8 weights, per-tensor
uint8 activations), evaluated in PyTorch.

torchao 0.18 ships the X86 (and ARM / XPU) inductor quantizers; the XNNPACK quantizer lives in
ExecuTorch now. The converted module runs reference quantize / dequantize ops in eager
PyTorch (numerically the INT8 model); ``torch.compile`` lowers it to fused INT8 kernels.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def quantize_pt2e(
    model: nn.Module, calib: np.ndarray, img_size: int, batch_size: int = 32
) -> nn.Module:
    """The PT2E-quantized copy of ``model`` (calibrated on ``calib (N, 3, S, S)``)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model.eval()
    example = (torch.randn(2, 3, img_size, img_size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model, example, dynamic_shapes=({0: batch},)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
        with torch.no_grad():
            for i in range(0, len(calib), batch_size):
                prepared(torch.from_numpy(np.ascontiguousarray(calib[i : i + batch_size])))
        return convert_pt2e(prepared)


@torch.no_grad()
def run_torch(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate(
        [
            model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).numpy()
            for i in range(0, len(images), batch_size)
        ]
    )
