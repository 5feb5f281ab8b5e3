from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as F

from vitssl.data_pipelines import color_ops as G


def images(batch: int = 3, size: int = 24, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, size, size, generator=g).to(device)


def check_ops_against_torchvision(device: str) -> None:
    x = images(device=device)
    f = torch.tensor([0.6, 1.0, 1.4], device=device)
    hue = torch.tensor([-0.1, 0.03, 0.25], device=device)
    sigma = torch.tensor([0.5, 1.2, 2.0], device=device)
    for i in range(3):
        xi = x[i : i + 1]
        pairs = [
            (G.adjust_brightness(x, f)[i], F.adjust_brightness(xi, float(f[i]))[0]),
            (G.adjust_contrast(x, f)[i], F.adjust_contrast(xi, float(f[i]))[0]),
            (G.adjust_saturation(x, f)[i], F.adjust_saturation(xi, float(f[i]))[0]),
            (G.adjust_hue(x, hue)[i], F.adjust_hue(xi, float(hue[i]))[0]),
            (G.grayscale(x).expand(-1, 3, -1, -1)[i], F.rgb_to_grayscale(xi, 3)[0]),
            (G.solarize(x)[i], F.solarize(xi, 0.5)[0]),
            # kernel 9 covers 4 sigma for sigma <= 1: identical taps
            (
                G.gaussian_blur(x, sigma.clamp(max=1.0), 9)[i],
                F.gaussian_blur(xi, [9, 9], [min(1.0, float(sigma[i]))] * 2)[0],
            ),
            # kernel 23 (10% of 224): taps beyond 4 sigma are dropped, < 1e-3 difference
            (
                G.gaussian_blur(x, sigma, 23)[i],
                F.gaussian_blur(xi, [23, 23], [float(sigma[i])] * 2)[0],
            ),
        ]
        for ours, ref in pairs:
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_ops_match_torchvision_on_cpu() -> None:
    check_ops_against_torchvision("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ops_match_torchvision_on_cuda() -> None:
    check_ops_against_torchvision("cuda")


def test_blur_with_full_radius_is_exact() -> None:
    x = images()
    sigma = torch.full((3,), 0.7)
    ref = F.gaussian_blur(x, [5, 5], [0.7, 0.7])
    torch.testing.assert_close(G.gaussian_blur(x, sigma, 5), ref, atol=1e-6, rtol=0)


def test_color_augment_is_per_sample_and_reproducible() -> None:
    x = images(batch=16)
    aug = G.ColorAugment(blur_kernel=5, solarize_p=0.5)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    changed = (a - x).abs().flatten(1).amax(dim=1) > 1e-6
    assert 0 < int(changed.sum()) <= 16  # per-sample decisions
    identity = G.ColorAugment(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    assert torch.equal(identity(x, torch.Generator().manual_seed(0)), x)
    gray = G.ColorAugment(jitter_p=0.0, gray_p=1.0, blur_p=0.0)(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
