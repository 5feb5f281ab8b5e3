"""Model FLOPs counted from the architecture (2 FLOPs per multiply-add; training = 3x forward).

Only matrix products are counted (linear layers, patch projections, attention scores and
values), as is usual for MFU; norms, softmax and activations are ignored.
"""

from __future__ import annotations


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of one pre-norm transformer block on ``tokens`` tokens of width ``dim``."""
    hidden = int(dim * mlp_ratio)
    linear = tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1 + fc2
    attention = 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    return 2 * (linear + attention)


def mae_forward_flops(
    img_size: int,
    patch_size: int,
    enc_dim: int,
    enc_depth: int,
    dec_dim: int,
    dec_depth: int,
    mask_ratio: float,
    mlp_ratio: float = 4.0,
) -> int:
    """Forward FLOPs of one image through MAE (encoder on visible tokens, decoder on all)."""
    length = (img_size // patch_size) ** 2
    visible = int(length * (1 - mask_ratio))
    patch_in = 3 * patch_size * patch_size
    flops = 2 * length * patch_in * enc_dim  # patch projection runs on every patch
    flops += enc_depth * block_flops(visible + 1, enc_dim, mlp_ratio)
    flops += 2 * (visible + 1) * enc_dim * dec_dim  # decoder_embed
    flops += dec_depth * block_flops(length + 1, dec_dim, mlp_ratio)
    flops += 2 * (length + 1) * dec_dim * patch_in  # decoder_pred
    return flops
