"""GPU acceptance check: one command, one markdown report (``make gpu-check``).

    python -m vitssl.train.gpu_check --out reports/gpu_check.md     # on one H100/H200, <= 8 min
    python -m vitssl.train.gpu_check --dry-run --out /tmp/gpu_check.md     # CPU, tiny sizes (tests)

Sections, each in its own subprocess with its own time box (a failure, an out-of-memory or a
time-out is written into its section and the others still run; the boxes add up to less
than ``--budget-s``):

* ``peak``: the measured dense bf16 matmul peak, the denominator of every MFU below.
* ``mae_vit_b`` / ``mae_vit_l``: MAE ViT-B/16 and ViT-L/16 at 224 px in bf16 through the
  project's engine (``vitssl.train.benchmark.build_engine``), with and without ``train.compile``
  and gradient checkpointing: images/s and MFU (model FLOPs of models.flops, 3x forward).
* ``data``: sustained images/s from full-size JPEG shards decoded by nvJPEG
  (``data.decode_on_device``) into MAE ViT-B steps, with the data-wait fraction.
* ``zero3_offload``: the largest ViT, from ViT-g/14 down, that trains a few steps under
  ZeRO-3 with CPU offload, with its peak GPU memory.
* ``zero2_vs_zero0``: MAE ViT-B step time under ZeRO-2 against ZeRO-0 on one GPU.
* ``tests``: the tests that skip without CUDA (``pytest -m gpu``), run.

``--dry-run`` runs every section on the CPU with tiny models and few steps, so the script is
known to work before a GPU is at hand; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """What the sections run: the real check on a GPU, or tiny stand-ins on the CPU."""

    img_size: int
    patch_size: int
    vit_b: str
    vit_l: str
    batch: int
    steps: int
    warmup: int
    peak_n: int
    offload_models: tuple[str, ...]
    data_images: int
    data_steps: int
    test_paths: tuple[str, ...]


GPU = Sizes(
    img_size=224,
    patch_size=16,
    vit_b="vit_base_patch16_224",
    vit_l="vit_large_patch16_224",
    batch=128,
    steps=10,
    warmup=3,
    peak_n=8192,
    offload_models=(
        "vit_giant_patch14_224",
        "vit_huge_patch14_224",
        "vit_large_patch16_224",
        "vit_base_patch16_224",
    ),
    data_images=512,
    data_steps=40,
    test_paths=("tests",),
)
DRY = Sizes(
    img_size=32,
    patch_size=8,
    vit_b="vit_tiny_patch16_224",
    vit_l="vit_tiny_patch16_224",
    batch=4,
    steps=2,
    warmup=1,
    peak_n=256,
    offload_models=("vit_tiny_patch16_224",),
    data_images=16,
    data_steps=2,
    test_paths=("tests/unit/data_pipelines",),
)

# seconds per section on the GPU; they sum to 440 s, leaving 40 s of the 8 minutes for
# subprocess start-up and the report
BOXES = {
    "peak": 15,
    "mae_vit_b": 120,
    "mae_vit_l": 120,
    "data": 55,
    "zero3_offload": 70,
    "zero2_vs_zero0": 30,
    "tests": 30,
}
DRY_BOX_SCALE = 4  # a shared 2-core CPU is slower than a GPU at starting and compiling
TITLES = {
    "peak": "Measured bf16 matmul peak",
    "mae_vit_b": "MAE ViT-B/16 training throughput",
    "mae_vit_l": "MAE ViT-L/16 training throughput",
    "data": "Sustained JPEG shards -> nvJPEG -> MAE ViT-B",
    "zero3_offload": "Largest ViT under ZeRO-3 + CPU offload",
    "zero2_vs_zero0": "ZeRO-2 against ZeRO-0 on one GPU",
    "tests": "Tests that skip without CUDA",
}


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _peak_tflops(sizes: Sizes) -> float:
    from vitssl.train.benchmark import measured_matmul_tflops

    dev = _device()
    return measured_matmul_tflops(
        dev, torch.bfloat16, sizes.peak_n, 20 if dev.type == "cuda" else 2
    )


def section_peak(sizes: Sizes, peak: float) -> list[str]:
    tf = _peak_tflops(sizes)
    return [f"{tf:.1f} TFLOP/s bf16 ({sizes.peak_n}^3 matmul)", "", f"<!-- peak={tf} -->"]


def _mae_rows(model: str, sizes: Sizes, peak: float) -> list[str]:
    from vitssl.train.benchmark import MAESetup, time_steps

    rows = ["| compile | grad ckpt | images/s | MFU |", "| --- | --- | ---: | ---: |"]
    for compiled in (False, True):
        for ckpt in (False, True):
            setup = MAESetup(
                model=model,
                img_size=sizes.img_size,
                patch_size=sizes.patch_size,
                batch=sizes.batch,
                compile=compiled,
                grad_checkpointing=ckpt,
            )
            try:
                step, fwd_flops = setup.project_step()
                ips = time_steps(step, sizes.batch, sizes.steps, warmup=sizes.warmup)
                mfu = 3 * fwd_flops * ips / 1e12 / peak if peak else float("nan")
                rows.append(f"| {compiled} | {ckpt} | {ips:.1f} | {100 * mfu:.1f}% |")
            except Exception as e:  # one failing configuration must not hide the others
                rows.append(f"| {compiled} | {ckpt} | failed: {_one_line(e)} | |")
            _free_memory()
            _save_partial(rows)
    return rows


def section_mae_vit_b(sizes: Sizes, peak: float) -> list[str]:
    return _mae_rows(sizes.vit_b, sizes, peak)


def section_mae_vit_l(sizes: Sizes, peak: float) -> list[str]:
    return _mae_rows(sizes.vit_l, sizes, peak)


def section_data(sizes: Sizes, peak: float) -> list[str]:
    from vitssl.data_pipelines.benchmark import sustained_mae, synthetic_jpeg_shards

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        shards = synthetic_jpeg_shards(Path(tmp), sizes.data_images)
        ips, wait = sustained_mae(
            shards,
            _device(),
            model=sizes.vit_b,
            img_size=sizes.img_size,
            patch_size=sizes.patch_size,
            batch=sizes.batch,
            steps=sizes.data_steps,
            workers=min(8, os.cpu_count() or 1),
        )
    where = "nvJPEG" if _device().type == "cuda" else "CPU decode (dry run)"
    return [
        "| decode | images/s | data wait |",
        "| --- | ---: | ---: |",
        f"| {where} | {ips:.1f} | {wait:.1%} |",
        "",
        f"{sizes.data_images} full-size (500x375) JPEGs written as shards, read in a loop.",
    ]


def section_zero3_offload(sizes: Sizes, peak: float) -> list[str]:
    from vitssl.train.benchmark import MAESetup, time_steps

    rows = ["| model | result | peak GPU memory |", "| --- | --- | ---: |"]
    for model in sizes.offload_models:
        setup = MAESetup(
            model=model,
            img_size=sizes.img_size,
            patch_size=14 if "patch14" in model and sizes is GPU else sizes.patch_size,
            batch=max(1, sizes.batch // 4),
            zero="zero3_offload",
            compile=False,
            grad_checkpointing=True,
        )
        _free_memory()
        try:
            step, _ = setup.project_step()
            ips = time_steps(step, setup.batch, 2, warmup=1)
        except Exception as e:
            rows.append(f"| {model} | failed: {_one_line(e)} | {_peak_memory()} |")
            _free_memory()
            continue
        rows.append(f"| {model} | trains, {ips:.1f} images/s | {_peak_memory()} |")
        break  # the largest that trains
    return rows


def section_zero2_vs_zero0(sizes: Sizes, peak: float) -> list[str]:
    from vitssl.train.benchmark import MAESetup, time_steps

    rows = ["| preset | ms/step | images/s |", "| --- | ---: | ---: |"]
    for zero in ("zero0", "zero2"):
        setup = MAESetup(
            model=sizes.vit_b,
            img_size=sizes.img_size,
            patch_size=sizes.patch_size,
            batch=sizes.batch,
            zero=zero,
            compile=False,
        )
        step, _ = setup.project_step()
        ips = time_steps(step, sizes.batch, sizes.steps, warmup=sizes.warmup)
        rows.append(f"| {zero} | {1e3 * sizes.batch / ips:.1f} | {ips:.1f} |")
        _free_memory()
    return rows


def section_tests(sizes: Sizes, peak: float) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*cmd, *sizes.test_paths], capture_output=True, text=True, cwd=REPO, check=False
    )
    tail = [line for line in proc.stdout.strip().splitlines() if line][-6:]
    return [
        f"`{' '.join(cmd[2:])} {' '.join(sizes.test_paths)}`: exit {proc.returncode}",
        "",
        "```",
        *tail,
        "```",
    ]


SECTIONS: dict[str, Callable[[Sizes, float], list[str]]] = {
    "peak": section_peak,
    "mae_vit_b": section_mae_vit_b,
    "mae_vit_l": section_mae_vit_l,
    "data": section_data,
    "zero3_offload": section_zero3_offload,
    "zero2_vs_zero0": section_zero2_vs_zero0,
    "tests": section_tests,
}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".replace("|", "/")


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> str:
    if not torch.cuda.is_available():
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


_PARTIAL: list[Path] = []  # the child's output file: rows written so far survive a time-out


def _save_partial(lines: list[str]) -> None:
    if _PARTIAL:
        _PARTIAL[0].write_text(json.dumps(lines))


def run_section(name: str, dry_run: bool, peak: float, out: Path) -> None:
    """Child process: run one section and write its lines as JSON to ``out``."""
    _PARTIAL[:] = [out]
    sizes = DRY if dry_run else GPU
    if dry_run:
        from vitssl.models import speed

        torch.set_num_threads(1)
        # dry runs trace and differentiate the compiled blocks (dynamo + AOT autograd) but
        # skip inductor's C++ code generation, minutes on a small CPU
        speed.compile_blocks.__defaults__ = ("aot_eager",)
    lines = SECTIONS[name](sizes, peak)
    out.write_text(json.dumps(lines))


def _spawn(name: str, dry_run: bool, peak: float, timeout: float) -> tuple[list[str], float]:
    """Run a section in a subprocess: its lines, or a one-line failure, and its seconds."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = Path(tmp) / "section.json"
        cmd = [
            sys.executable,
            "-m",
            "vitssl.train.gpu_check",
            "--section",
            name,
            "--json",
            str(out),
        ]
        cmd += ["--peak", str(peak)] + (["--dry-run"] if dry_run else [])
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
            )
        except subprocess.TimeoutExpired:
            done = list(json.loads(out.read_text())) if out.is_file() else []
            note = f"**timed out** after {timeout:.0f} s (its time box)"
            return [note, "", *done], time.perf_counter() - t0
        took = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
            return [f"**failed** (exit {proc.returncode})", "", "```", *err, "```"], took
        return list(json.loads(out.read_text())), took


def write_report(out: Path, dry_run: bool, budget_s: float, only: list[str]) -> int:
    """Run the sections in turn within ``budget_s`` and write the markdown report; the
    number of sections that failed or timed out."""
    start = time.perf_counter()
    total = sum(BOXES[name] for name in only) * (DRY_BOX_SCALE if dry_run else 1)
    scale = (DRY_BOX_SCALE if dry_run else 1) * min(1.0, budget_s / total)
    hw = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU check: {hw}", "", f"{now}; torch {torch.__version__}; dry run: {dry_run}", ""]
    peak, failed = 0.0, 0
    for name in only:
        left = budget_s - (time.perf_counter() - start)
        body, took = _spawn(name, dry_run, peak, max(1.0, min(BOXES[name] * scale, left)))
        failed += int(bool(body) and body[0].startswith("**"))
        if name == "peak" and body and "peak=" in body[-1]:
            peak = float(body[-1].split("peak=")[1].split()[0])
            body = body[:-2]
        lines += [f"## {TITLES[name]}", "", *body, "", f"_{took:.0f} s_", ""]
        print(f"gpu-check: {name} done in {took:.0f} s", file=sys.stderr, flush=True)
    lines.append(f"Total {time.perf_counter() - start:.0f} s.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vitssl.train.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("reports/gpu_check.md"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script")
    p.add_argument("--budget-s", type=float, default=460.0, help="seconds for all sections")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        run_section(args.section, args.dry_run, args.peak, args.json)
        return 0
    only = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(
            f"config error: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "config error: no CUDA GPU here; use --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    failed = write_report(args.out, args.dry_run, args.budget_s, only)
    print(f"report: {args.out} ({failed} section(s) failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
