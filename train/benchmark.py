"""MAE training throughput and model-FLOPs utilisation (MFU) on this machine.

``python -m train.benchmark [--model vit_tiny_patch16_224 --img-size 32 --patch-size 4]``
times optimizer steps of MAE through the DeepSpeed engine on in-memory images (so only
the model is measured; the data path has its own benchmark) and prints a markdown table.
MFU = achieved model FLOP/s / peak, where model FLOPs come from the architecture
(models.flops, training = 3 x forward) and the peak is a dense matmul measured here in
the same precision (or given with --peak-tflops).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
from timm.models.vision_transformer import VisionTransformer

from models.flops import mae_forward_flops
from models.registry import create_method
from train.config import load_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.benchmark",
        description="Time MAE optimizer steps through DeepSpeed on in-memory images; print"
        " images/s, model FLOPs and MFU (achieved / measured matmul peak) as a table.",
    )
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--decoder-dim", type=int, default=128)
    p.add_argument("--decoder-depth", type=int, default=2)
    p.add_argument("--decoder-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32" if not torch.cuda.is_available() else "bf16")
    p.add_argument("--zero", default="zero0")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="skip the matmul measurement")
    args = p.parse_args(argv)

    from train.engine import build_engine
    from train.trainer import init_distributed

    _, world, device = init_distributed()
    overrides = [
        f"model.name={args.model}",
        f"model.img_size={args.img_size}",
        f"model.patch_size={args.patch_size}",
        f"method.decoder_dim={args.decoder_dim}",
        f"method.decoder_depth={args.decoder_depth}",
        f"method.decoder_heads={args.decoder_heads}",
        f"train.micro_batch={args.batch}",
        f"train.precision={args.precision}",
        f"train.zero={args.zero}",
        f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}",
        f"optim.fused={str(device.type == 'cuda').lower()}",
    ]
    cfg = load_config("mae_vit_tiny_demo", overrides)
    method = create_method(cfg.method, cfg.model)
    engine = build_engine(cfg, method, world, device).engine  # as the trainer builds it
    dtype = DTYPES[args.precision]
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    batch = {"views": [imgs]}
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    images_per_s = args.batch * args.steps * world / elapsed
    vit = method.backbone
    assert isinstance(vit, VisionTransformer)
    fwd = mae_forward_flops(
        args.img_size,
        args.patch_size,
        vit.embed_dim,
        len(vit.blocks),
        args.decoder_dim,
        args.decoder_depth,
        cfg.method.mask_ratio,  # type: ignore[attr-defined]
    )
    achieved = 3 * fwd * images_per_s / 1e12
    peak = args.peak_tflops or measured_matmul_tflops(
        device, dtype, 4096 if device.type == "cpu" else 8192, 3 if device.type == "cpu" else 50
    )
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    threads = torch.get_num_threads()
    print(
        f"\nMAE {args.model} @ {args.img_size}px/p{args.patch_size}, batch {args.batch}, "
        f"{args.precision}, {args.zero}, {world} process(es), {threads} threads, {hw or 'cpu'}, "
        f"{date.today()}"
    )
    print("| images/s | model GFLOP/img (train) | achieved TFLOP/s | peak matmul TFLOP/s | MFU |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {images_per_s:.1f} | {3 * fwd / 1e9:.3f} | {achieved:.4f} | {peak:.4f} | "
        f"{100 * achieved / peak:.1f}% |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
