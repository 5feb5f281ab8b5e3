"""MAE pieces against independent computations, and the loss against the reference MAE.

``ReferenceMAE`` below transcribes the published reference implementation
(facebookresearch/mae, models_mae.py: numpy sin-cos table, random_masking,
forward_encoder/decoder/loss, patchify with einsum) so that our implementation, which uses
einops, gather on indices and timm's ViT, is checked against the original formulation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitssl.models.methods.mae import (
    MAE,
    MAEConfig,
    build_mae,
    masked_mse,
    patchify,
    random_masking,
    unpatchify,
)
from vitssl.models.pos_embed import sincos_2d
from vitssl.models.vit import create_vit, forward_tokens
from vitssl.train.config import ModelSection
from vitssl.train.mae_reference import ReferenceMAE, sincos_2d_reference


@pytest.mark.parametrize("dim,grid", [(192, 8), (64, 4), (768, 14)])
def test_sincos_matches_reference(dim: int, grid: int) -> None:
    ours = sincos_2d(dim, grid, cls_token=True).numpy()
    np.testing.assert_allclose(ours, sincos_2d_reference(dim, grid, cls_token=True), atol=1e-6)


# ---------------------------------------------------------------- patchify
def test_patchify_matches_reference_einsum_and_roundtrips() -> None:
    imgs = torch.randn(2, 3, 32, 32)
    p = 4
    h = w = 32 // p
    x = imgs.reshape(2, 3, h, p, w, p)
    ref = torch.einsum("nchpwq->nhwpqc", x).reshape(2, h * w, p * p * 3)
    assert torch.equal(patchify(imgs, p), ref)
    assert torch.equal(unpatchify(patchify(imgs, p), p), imgs)
    # patch (row 1, col 2) holds pixels [4:8, 8:12]
    assert torch.equal(
        patchify(imgs, p)[:, 1 * w + 2].reshape(2, p, p, 3).permute(0, 3, 1, 2),
        imgs[:, :, 4:8, 8:12],
    )


# ---------------------------------------------------------------- masking
def test_random_masking_keeps_lowest_noise() -> None:
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    ids_keep, mask, ids_restore = random_masking(3, 16, 0.75, noise)
    assert ids_keep.shape == (3, 4)
    assert mask.sum(dim=1).tolist() == [12, 12, 12]
    for b in range(3):
        lowest = set(torch.topk(noise[b], 4, largest=False).indices.tolist())
        assert set(ids_keep[b].tolist()) == lowest
        assert all(mask[b, i] == 0 for i in lowest)
        # ids_restore inverts the shuffle
        shuffle = torch.argsort(noise[b])
        assert torch.equal(shuffle[ids_restore[b]], torch.arange(16))


def test_masked_mse_against_loop() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float32)
    for norm in (False, True):
        total, count = 0.0, 0
        for b in range(2):
            for i in range(5):
                if mask[b, i]:
                    t = target[b, i]
                    if norm:
                        t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
                    total += float(((pred[b, i] - t) ** 2).mean())
                    count += 1
        assert masked_mse(pred, target, mask, norm).item() == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------- reference MAE
def _copy_weights(ours: MAE, ref: ReferenceMAE) -> None:
    enc = ours.backbone
    ref_state = ref.state_dict()
    for name in list(ref_state):
        if name.startswith(("decoder_", "mask_token")):
            src = dict(ours.named_parameters()) | dict(ours.named_buffers())
            ref_state[name] = src[name].detach().clone()
        else:
            ref_state[name] = enc.state_dict()[name].detach().clone()
    ref.load_state_dict(ref_state)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_equals_reference(norm_pix: bool) -> None:
    torch.manual_seed(0)
    cfg = MAEConfig(
        mask_ratio=0.75, decoder_dim=64, decoder_depth=2, decoder_heads=4, norm_pix_loss=norm_pix
    )
    ours = MAE(cfg, create_vit("vit_tiny_patch16_224", img_size=32, patch_size=4))
    ours.backbone.blocks = ours.backbone.blocks[:2]
    ref = ReferenceMAE(32, 4, 192, 2, 3, 64, 2, 4, norm_pix_loss=norm_pix)
    _copy_weights(ours, ref)
    ours.eval()
    ref.eval()
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64)
    loss, pred, mask = ours.forward_with_noise(imgs, noise)
    ref_loss, ref_pred, ref_mask = ref(imgs, 0.75, noise)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    # the same noise through forward() gives the same loss: reproducible
    out = ours({"views": [imgs], "mask_noise": noise})
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_visible_encoding_matches_full_encoding_of_subset() -> None:
    """Encoding only visible tokens == encoding an image whose tokens are exactly those."""
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    imgs = torch.randn(2, 3, 32, 32)
    all_ids = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(forward_tokens(vit, imgs, all_ids), forward_tokens(vit, imgs))
    assert vit.pos_embed.requires_grad is False
    assert all(b.attn.fused_attn for b in vit.blocks)


def test_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8)
    ckpt = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, grad_checkpointing_every=2)
    ckpt.load_state_dict(plain.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt):
        forward_tokens(m, imgs).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_reconstruct_pastes_visible_patches() -> None:
    torch.manual_seed(0)
    cfg = MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    mae = MAE(cfg, create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8)).eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    recon = mae.reconstruct(imgs, noise)
    _, mask, _ = random_masking(2, 16, cfg.mask_ratio, noise)
    visible = patchify(recon, 8)[mask == 0]
    torch.testing.assert_close(visible, patchify(imgs, 8)[mask == 0])


def test_initialisation_is_the_official_one_layer_by_layer() -> None:
    """He et al. 2022 (official models_mae.py initialize_weights): Xavier-uniform for every
    Linear, encoder blocks included, so each weight's std is sqrt(2 / (fan_in + fan_out))
    (uniform on +-sqrt(6 / (fan_in + fan_out))); zero biases; LayerNorm 1 / 0; the patch
    projection Xavier on its flattened weight; class and mask tokens N(0, 0.02).
    Tolerance: the std of n i.i.d. samples has relative standard error ~ sqrt(1 / (2n))
    (uniform: sqrt(0.8 / (4n)) from its kurtosis 1.8); 5 of those."""
    torch.manual_seed(0)
    cfg = MAEConfig(decoder_dim=64, decoder_depth=2, decoder_heads=4)
    method = build_mae(cfg, ModelSection(name="vit_small_patch16_224", img_size=32, patch_size=4))
    checked = 0
    for name, m in method.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            n = m.weight.numel()
            tol = 5 * math.sqrt(0.8 / (4 * n))
            assert m.weight.std().item() == pytest.approx(
                math.sqrt(2.0 / (fan_in + fan_out)), rel=tol
            ), name
            assert m.weight.abs().max().item() <= bound, name
            assert m.bias is None or torch.count_nonzero(m.bias) == 0, name
            checked += 1
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert checked >= 4 * 12 + 4 * 2 + 2  # every encoder block's qkv, proj, fc1, fc2
    qkv = method.backbone.blocks[0].attn.proj.weight
    assert qkv.std().item() == pytest.approx(math.sqrt(2 / (384 + 384)), rel=0.02)  # 0.051
    w = method.backbone.patch_embed.proj.weight.flatten(1)  # (D, 3 p p)
    fan_out, fan_in = w.shape
    assert w.std().item() == pytest.approx(
        math.sqrt(2.0 / (fan_in + fan_out)), rel=5 * math.sqrt(0.8 / (4 * w.numel()))
    )
    for token in (method.backbone.cls_token, method.mask_token):
        n = token.numel()
        assert token.std().item() == pytest.approx(0.02, rel=5 * math.sqrt(1 / (2 * n)))


def test_masked_vit_is_a_timm_vit_with_the_same_state_dict() -> None:
    import timm

    from vitssl.models.vit import MaskedViT

    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    assert isinstance(vit, MaskedViT)
    plain = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0, global_pool="token"
    ).eval()
    plain.load_state_dict(vit.state_dict())  # strict: the same names and shapes
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(imgs), vit(imgs))  # timm's forward is unchanged
    torch.testing.assert_close(vit.forward_features(imgs)[:, 0], vit(imgs))
    with pytest.raises(ValueError, match="grad_checkpointing_every"):
        vit.set_grad_checkpointing_every(-1)
