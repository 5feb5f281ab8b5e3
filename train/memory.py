"""Per-GPU memory estimate of an MAE pretraining run under each ZeRO preset.

    python -m vitssl.train.memory --model vit_base_patch16_224 --img-size 224 --gpus 8 --nodes 1

Model states (parameters, gradients, optimizer states) come from DeepSpeed's own
estimators, ``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` (the ``*_all_cold`` functions print exactly
these numbers for every offload option); ZeRO-1, for which DeepSpeed has no estimator, uses
the same accounting with only the optimizer's fp32 states partitioned. The model is built
on the meta device (no memory), so any size can be asked for.

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models": a pre-norm transformer block of width ``h`` over ``s`` tokens keeps
about ``34 * s * b * h`` bytes of 16-bit activations for the backward pass at micro batch
``b`` (their ``s*b*h*(34 + 5*a*s/h)`` without the ``5*a*s/h`` attention-score term, which
fused attention does not store); fp32 doubles it. MAE's encoder sees the visible tokens
only, ``s = L * (1 - mask_ratio) + 1``, its decoder all of them, ``s = L + 1``. With
activation checkpointing a block keeps only its input (``2 * s * b * h``) and one block's
full activations are live during its recomputation. It is a rough floor: the allocator's
fragmentation, communication buckets and the CUDA context (about 0.5-1 GiB) come on top.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

GIB = 2**30
BUFFER_FACTOR = 1.5
"""DeepSpeed's default ``additional_buffer_factor`` for CPU memory."""


@dataclass(frozen=True)
class ModelSize:
    """What the estimators need to know about a model."""

    trainable_params: int
    largest_layer_params: int
    """Parameters of the largest single module (what ZeRO-3 gathers at once)."""


@dataclass(frozen=True)
class ZeroEstimate:
    """Model-state memory of one setup, in bytes."""

    setup: str
    gpu_bytes: int
    """Per GPU."""
    cpu_bytes: int
    """Per node (pinned host memory for offload; a buffer for loading otherwise)."""


def model_size(model: nn.Module) -> ModelSize:
    """Trainable parameters and the largest single module's own parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        default=0,
    )
    return ModelSize(trainable, largest)


def zero_estimates(size: ModelSize, gpus_per_node: int, nodes: int) -> list[ZeroEstimate]:
    """ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-3 with parameters and optimizer offloaded to CPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p = size.trainable_params
    total_gpus = gpus_per_node * nodes
    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(
        p, gpus_per_node, nodes, cpu_offload=False, additional_buffer_factor=BUFFER_FACTOR
    )
    # ZeRO-1 partitions only the fp32 master weights and Adam moments (16 bytes/param in
    # DeepSpeed's accounting); the 16-bit parameters and gradients (2 + 2) stay replicated.
    gpu1 = 4 * p + int(16 * p / total_gpus)
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(
        p,
        size.largest_layer_params,
        gpus_per_node,
        nodes,
        cpu_offload=False,
        zero_init=True,
        additional_buffer_factor=BUFFER_FACTOR,
    )
    cpu3o, gpu3o, _ = estimate_zero3_model_states_mem_needs(
        p,
        size.largest_layer_params,
        gpus_per_node,
        nodes,
        cpu_offload=True,
        cpu_offload_params=True,
        zero_init=True,
        additional_buffer_factor=BUFFER_FACTOR,
    )
    return [
        ZeroEstimate("zero1", gpu1, cpu2),
        ZeroEstimate("zero2", gpu2, cpu2),
        ZeroEstimate("zero3", gpu3, cpu3),
        ZeroEstimate("zero3_offload", gpu3o, cpu3o),
    ]


def block_activation_bytes(tokens: int, micro_batch: int, width: int, bytes_per_value: int) -> int:
    """One transformer block's saved activations (Korthikanti et al., fused attention)."""
    return 17 * bytes_per_value * tokens * micro_batch * width


def mae_activation_bytes(
    *,
    num_patches: int,
    mask_ratio: float,
    micro_batch: int,
    enc_width: int,
    enc_depth: int,
    dec_width: int,
    dec_depth: int,
    bytes_per_value: int,
    grad_checkpointing: bool,
) -> int:
    """Activation bytes of one MAE micro batch per GPU (see the module docstring)."""
    enc_tokens = int(num_patches * (1 - mask_ratio)) + 1
    dec_tokens = num_patches + 1
    enc_block = block_activation_bytes(enc_tokens, micro_batch, enc_width, bytes_per_value)
    dec_block = block_activation_bytes(dec_tokens, micro_batch, dec_width, bytes_per_value)
    if not grad_checkpointing:
        return enc_depth * enc_block + dec_depth * dec_block
    enc_input = bytes_per_value * enc_tokens * micro_batch * enc_width
    return enc_depth * enc_input + dec_depth * dec_block + enc_block


# ---------------------------------------------------------------------- the MAE model


@dataclass(frozen=True)
class MaeShape:
    num_patches: int
    enc_width: int
    enc_depth: int
    dec_width: int
    dec_depth: int


def build_mae_on_meta(
    model: str, img_size: int, patch_size: int, mask_ratio: float, dec_width: int, dec_depth: int
) -> tuple[nn.Module, MaeShape]:
    """The project's MAE (encoder + decoder), with every tensor on the meta device."""
    from vitssl.models.methods.mae import MAEConfig
    from vitssl.models.registry import create_method
    from vitssl.train.config import ModelSection

    heads = max(1, dec_width // 32)
    method_cfg = MAEConfig(
        mask_ratio=mask_ratio, decoder_dim=dec_width, decoder_depth=dec_depth, decoder_heads=heads
    )
    model_cfg = ModelSection(name=model, img_size=img_size, patch_size=patch_size)
    with torch.device("meta"):
        mae = create_method(method_cfg, model_cfg)
    encoder = next(m for m in mae.modules() if isinstance(m, VisionTransformer))
    shape = MaeShape(
        num_patches=(img_size // patch_size) ** 2,
        enc_width=int(encoder.embed_dim),
        enc_depth=len(list(encoder.blocks.children())),
        dec_width=dec_width,
        dec_depth=dec_depth,
    )
    return mae, shape


def default_patch_size(model: str) -> int:
    m = re.search(r"patch(\d+)", model)
    return int(m.group(1)) if m else 16


# ---------------------------------------------------------------------- command line


def format_table(
    title: str, estimates: list[ZeroEstimate], activations: int, activation_note: str
) -> str:
    rows = [title, "", f"{'setup':<16}{'model states/GPU':>18}{'+ activations/GPU':>20}"]
    rows[-1] += f"{'CPU/node':>12}"
    for e in estimates:
        rows.append(
            f"{e.setup:<16}{e.gpu_bytes / GIB:>14.2f} GiB{(e.gpu_bytes + activations) / GIB:>16.2f}"
            f" GiB{e.cpu_bytes / GIB:>8.1f} GiB"
        )
    rows += ["", f"activations: {activations / GIB:.2f} GiB per GPU ({activation_note})"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vitssl.train.memory",
        description="Estimate per-GPU memory of MAE pretraining under ZeRO-1/2/3 and offload.",
    )
    p.add_argument("--model", default="vit_base_patch16_224", help="a timm ViT name")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, help="default: from the model name")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=64, help="images per GPU per step")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args(argv)
    if args.gpus < 1 or args.nodes < 1 or args.micro_batch < 1:
        p.error("--gpus, --nodes and --micro-batch must be >= 1")
    patch = args.patch_size or default_patch_size(args.model)
    try:
        mae, shape = build_mae_on_meta(
            args.model, args.img_size, patch, args.mask_ratio, args.decoder_dim, args.decoder_depth
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = model_size(mae)
    estimates = zero_estimates(size, args.gpus, args.nodes)
    bytes_per_value = 4 if args.precision == "fp32" else 2
    activations = mae_activation_bytes(
        num_patches=shape.num_patches,
        mask_ratio=args.mask_ratio,
        micro_batch=args.micro_batch,
        enc_width=shape.enc_width,
        enc_depth=shape.enc_depth,
        dec_width=shape.dec_width,
        dec_depth=shape.dec_depth,
        bytes_per_value=bytes_per_value,
        grad_checkpointing=args.grad_checkpointing,
    )
    title = (
        f"MAE {args.model} (img {args.img_size}, patch {patch}, decoder "
        f"{args.decoder_dim}x{args.decoder_depth}): {size.trainable_params / 1e6:.1f}M trainable "
        f"params, largest layer {size.largest_layer_params / 1e6:.2f}M; "
        f"{args.nodes} node(s) x {args.gpus} GPU(s)"
    )
    note = f"MAE, micro batch {args.micro_batch}, {args.precision}, 34*s*b*h bytes per block" + (
        ", activation checkpointing" if args.grad_checkpointing else ""
    )
    print(format_table(title, estimates, activations, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
