"""MAE training images/s against the official MAE code, and model-FLOPs utilisation (MFU).

    python -m vitssl.train.benchmark                # ViT-tiny, 32 px, patch 4, decoder 128x4,
                                                    # batch 128, bf16: project vs reference
    python -m vitssl.train.benchmark --model vit_base_patch16_224 --img-size 224 --patch-size 16 \\
        --decoder-dim 512 --decoder-depth 8 --decoder-heads 16 --batch 64 --no-reference

Both sides train MAE on the same in-memory images (the data path has its own benchmark,
``python -m vitssl.data_pipelines.benchmark``), in the same process, alternately, ``--rounds``
times (the table gives each round and the median of the per-round ratios):

* **reference**: the official MAE model code transcribed eagerly (``train.mae_reference``),
  the same configuration, bf16 autocast and ``torch.optim.AdamW`` with the same decay
  groups, no DeepSpeed: what ``main_pretrain.py`` of facebookresearch/mae runs. Its
  attention is timm's Block as installed today (SDPA; ``--reference-attention math`` gives
  the matmul + softmax of the timm 0.3.2 that the MAE repository pins).
* **project**: what ``python -m vitssl.train.pretrain`` runs: the method from the registry, the
  config's speed switches (``train.compile`` as the recipe sets it, or ``--compile on|off``;
  ``model.attention``, whose ``auto`` picks matmul + softmax on CPUs: PyTorch's CPU SDPA
  backward costs about 14x its forward at these sizes, half the step in torch.profiler)
  and the DeepSpeed engine of :func:`build_engine` with the config's precision and ZeRO preset.

Images/s are wall-clock; ``CPU s/img`` is the process's CPU time per image (all threads),
steadier than wall time on a shared machine. MFU = achieved model FLOP/s / peak: model
FLOPs from the architecture (models.flops, training = 3 x forward) and the peak a dense
matmul measured here in the same precision (or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import torch
from timm.models.vision_transformer import VisionTransformer

from vitssl.models.flops import mae_forward_flops
from vitssl.models.registry import create_method
from vitssl.train.config import RunConfig, load_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Step = Callable[[], None]


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


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class MAESetup:
    """One MAE configuration, trained either the project's way or the reference's way."""

    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 4
    decoder_dim: int = 128
    decoder_depth: int = 4
    decoder_heads: int = 4
    batch: int = 128
    precision: str = "bf16"
    zero: str = "zero0"
    compile: bool | None = None
    """``train.compile``; None: the recipe's value (what ``vitssl.train.pretrain`` does)."""
    grad_checkpointing: bool = False
    attention: str = "auto"
    """``model.attention`` of the project (auto: math attention on CPUs, SDPA on GPUs)."""
    reference_attention: str = "fused"
    """The reference's attention: ``fused`` is what timm's Block does today (SDPA);
    ``math`` is the matmul + softmax of the timm 0.3.2 that the official repository pins."""

    def config(self) -> RunConfig:
        overrides = [
            f"model.name={self.model}",
            f"model.img_size={self.img_size}",
            f"model.patch_size={self.patch_size}",
            f"method.decoder_dim={self.decoder_dim}",
            f"method.decoder_depth={self.decoder_depth}",
            f"method.decoder_heads={self.decoder_heads}",
            f"train.micro_batch={self.batch}",
            f"train.precision={self.precision}",
            f"train.zero={self.zero}",
            f"model.grad_checkpointing={str(self.grad_checkpointing).lower()}",
            f"model.attention={self.attention}",
        ]
        if self.compile is not None:
            overrides.append(f"train.compile={str(self.compile).lower()}")
        return load_config("mae_vit_tiny_demo", overrides)

    def images(self, device: torch.device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.batch, 3, self.img_size, self.img_size, generator=gen)
        return x.to(device)

    def project_step(self) -> tuple[Step, int]:
        """One optimizer step of the project's path, and the model's forward FLOPs per image."""
        from vitssl.train.engine import build_engine
        from vitssl.train.trainer import init_distributed

        _, world, device = init_distributed()
        cfg = self.config()
        torch.manual_seed(0)
        method = create_method(cfg.method, cfg.model)
        engine = build_engine(cfg, method, world, device).engine  # as the trainer builds it
        batch = {"views": [self.images(device).to(DTYPES[self.precision])]}

        def step() -> None:
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()

        vit = method.backbone
        assert isinstance(vit, VisionTransformer)
        fwd = mae_forward_flops(
            self.img_size,
            self.patch_size,
            vit.embed_dim,
            len(vit.blocks),
            self.decoder_dim,
            self.decoder_depth,
            cfg.method.mask_ratio,  # type: ignore[attr-defined]
        )
        return step, fwd

    def reference_step(self) -> Step:
        """One eager step of the official MAE code with the same sizes and optimizer."""
        from vitssl.models.speed import set_fused_attention
        from vitssl.train.mae_reference import ReferenceMAE

        device = _device()
        cfg = self.config()
        torch.manual_seed(0)
        vit = create_method(cfg.method, cfg.model).backbone  # the encoder's sizes only
        assert isinstance(vit, VisionTransformer)
        heads = int(vit.blocks[0].attn.num_heads)  # type: ignore[union-attr, arg-type]
        ref = ReferenceMAE(
            self.img_size,
            self.patch_size,
            vit.embed_dim,
            len(vit.blocks),
            heads,
            self.decoder_dim,
            self.decoder_depth,
            self.decoder_heads,
            norm_pix_loss=True,
        ).to(device)
        set_fused_attention(ref, self.reference_attention == "fused")
        decay = [p for n, p in ref.named_parameters() if p.requires_grad and p.ndim > 1]
        rest = [p for n, p in ref.named_parameters() if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95))
        imgs = self.images(device)
        autocast = self.precision != "fp32"

        def step() -> None:
            with torch.autocast(device.type, DTYPES[self.precision], enabled=autocast):
                loss, _, _ = ref(imgs, 0.75)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step


def time_steps(step: Step, batch: int, steps: int, warmup: int = 0) -> float:
    """Images/s over ``steps`` steps after ``warmup`` untimed ones."""
    return _timed(step, batch, steps, warmup)[0]


def _timed(step: Step, batch: int, steps: int, warmup: int = 0) -> tuple[float, float]:
    """(images/s, CPU seconds per image) over ``steps`` steps after ``warmup`` ones."""
    device = _device()
    for _ in range(warmup):
        step()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    images = max(1, batch * steps)
    return images / (time.perf_counter() - t0), (time.process_time() - c0) / images


def compare(setup: MAESetup, rounds: int, steps: int, warmup: int) -> dict[str, list]:
    """Alternate the reference and the project ``rounds`` times (after their warm-ups)."""
    ref = setup.reference_step()
    ours, fwd = setup.project_step()
    _timed(ref, setup.batch, 0, warmup)
    _timed(ours, setup.batch, 0, warmup)  # includes the compilation
    runs: dict[str, list] = {"reference": [], "project": [], "fwd": [fwd]}
    for i in range(rounds):
        runs["reference"].append(_timed(ref, setup.batch, steps))
        runs["project"].append(_timed(ours, setup.batch, steps))
        ratio = runs["project"][-1][0] / runs["reference"][-1][0]
        print(f"round {i + 1}: project / reference = {ratio:.2f}x", file=sys.stderr, flush=True)
    return runs


def report(setup: MAESetup, runs: dict[str, list], peak: float) -> str:
    """The markdown table: per-round and median images/s, ratio, CPU time and MFU."""
    fwd = runs["fwd"][0]
    ours, ref = runs["project"], runs.get("reference", [])
    lines = [
        f"MAE {setup.model} @ {setup.img_size}px/p{setup.patch_size}, decoder "
        f"{setup.decoder_dim}x{setup.decoder_depth}, batch {setup.batch}, {setup.precision}, "
        f"{setup.zero}, compile {setup.config().train.compile}, attention: project "
        f"{setup.attention}, reference {setup.reference_attention}, "
        f"{torch.get_num_threads()} threads, "
        f"{platform.processor() or 'cpu'}, {date.today()}",
        "",
        "| round | reference img/s | project img/s | ratio | CPU s/img ref / project |",
        "|---|---:|---:|---:|---:|",
    ]
    ratios = []
    for i, o in enumerate(ours):
        if ref:
            ratios.append(o[0] / ref[i][0])
            lines.append(
                f"| {i + 1} | {ref[i][0]:.1f} | {o[0]:.1f} | {ratios[-1]:.2f}x "
                f"| {ref[i][1] * 1e3:.2f} / {o[1] * 1e3:.2f} ms |"
            )
        else:
            lines.append(f"| {i + 1} | | {o[0]:.1f} | | {o[1] * 1e3:.2f} ms |")
    ips = statistics.median(o[0] for o in ours)
    achieved = 3 * fwd * ips / 1e12
    median_ratio = f"**{statistics.median(ratios):.2f}x**" if ratios else ""
    ref_ips = f"{statistics.median(r[0] for r in ref):.1f}" if ref else ""
    lines += [
        f"| median | {ref_ips} | {ips:.1f} | {median_ratio} | |",
        "",
        "| model GFLOP/img (train) | achieved TFLOP/s | peak matmul TFLOP/s | MFU |",
        "|---:|---:|---:|---:|",
        f"| {3 * fwd / 1e9:.3f} | {achieved:.4f} | {peak:.4f} | {100 * achieved / peak:.1f}% |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vitssl.train.benchmark", description=__doc__.split("\n")[0]
    )
    d = MAESetup()
    p.add_argument("--model", default=d.model)
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--decoder-dim", type=int, default=d.decoder_dim)
    p.add_argument("--decoder-depth", type=int, default=d.decoder_depth)
    p.add_argument("--decoder-heads", type=int, default=d.decoder_heads)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", choices=sorted(DTYPES), default=d.precision)
    p.add_argument("--zero", default=d.zero)
    p.add_argument(
        "--compile", choices=["on", "off"], help="train.compile (default: the recipe's value)"
    )
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--attention", choices=["auto", "fused", "math"], default=d.attention)
    p.add_argument(
        "--reference-attention",
        choices=["fused", "math"],
        default=d.reference_attention,
        help="fused: timm's Block today (SDPA); math: timm 0.3.2, as the MAE repository pins",
    )
    p.add_argument("--no-reference", action="store_true", help="time the project only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="skip the matmul measurement")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = MAESetup(
        model=args.model,
        img_size=args.img_size,
        patch_size=args.patch_size,
        decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads,
        batch=args.batch,
        precision=args.precision,
        zero=args.zero,
        compile=None if args.compile is None else args.compile == "on",
        grad_checkpointing=args.grad_checkpointing,
        attention=args.attention,
        reference_attention=args.reference_attention,
    )
    if args.no_reference:
        ours, fwd = setup.project_step()
        _timed(ours, setup.batch, 0, args.warmup)
        runs: dict[str, list] = {"project": [], "fwd": [fwd]}
        runs["project"] = [_timed(ours, setup.batch, args.steps) for _ in range(args.rounds)]
    else:
        runs = compare(setup, args.rounds, args.steps, args.warmup)
    device = _device()
    peak = args.peak_tflops or measured_matmul_tflops(
        device,
        DTYPES[args.precision],
        4096 if device.type == "cpu" else 8192,
        3 if device.type == "cpu" else 50,
    )
    print("\n" + report(setup, runs, peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
