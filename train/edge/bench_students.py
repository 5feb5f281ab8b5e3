"""Benchmark: INT8 speed-up over FP32 of each edge student, per scheme and runtime.

    python -m vitssl.train.edge.bench_students [--size 32] [--students a,b] [--threads 1]

Speed does not depend on the weights, so each student is built untrained (CIFAR stem at
32 px), exported to FP32 ONNX, quantized with every scheme of ``quantize_ort.SCHEMES`` (16
random calibration images) and timed against its FP32 model side by side, on ONNX Runtime
and, when installed, OpenVINO (reading the same ONNX files). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from vitssl.train.edge.quantize_ort import SCHEMES, QuantSettings
from vitssl.train.edge.verify import cpu_flags, latency_ms

DEFAULT_STUDENTS = (
    "resnet18",
    "mobilenetv2_100",
    "efficientnet_lite0",
    "mobilenetv4_conv_small",
    "mobilenetv3_large_100",
)


def bench(name: str, size: int, threads: int, repeats: int, runtimes: list[str]) -> list[str]:
    import torch

    from vitssl.models.backbones import create_backbone
    from vitssl.train.edge.onnx_export import InferenceModel, export_onnx
    from vitssl.train.edge.quantize_ort import quantize_int8

    torch.manual_seed(0)
    from vitssl.train.config import ModelSection

    spec = ModelSection(name=name, img_size=size, cifar_stem=size <= 64)
    model = InferenceModel(create_backbone(spec, "student"), pool="avg")
    calib = np.random.default_rng(0).standard_normal((16, 3, size, size)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", size, exporter="torchscript").path
        base_settings = QuantSettings()
        files = {
            s: quantize_int8(fp32, Path(tmp) / f"{s}.onnx", calib, base_settings.for_scheme(s))
            for s in SCHEMES
        }
        for rt in runtimes:
            base = {b: latency_ms(fp32, size, b, threads, repeats, 3, rt)["median_ms"]
                    for b in (1, 32)}  # fmt: skip
            for s, path in files.items():
                lat = {b: latency_ms(path, size, b, threads, repeats, 3, rt)["median_ms"]
                       for b in (1, 32)}  # fmt: skip
                ratio = fp32.stat().st_size / path.stat().st_size
                rows.append(
                    f"| {name} | {rt} | {s} | {base[1]:.2f} / {base[32]:.1f} | "
                    f"{lat[1]:.2f} / {lat[32]:.1f} | {base[1] / lat[1]:.2f} | "
                    f"{base[32] / lat[32]:.2f} | {ratio:.2f} |"
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--students", default=",".join(DEFAULT_STUDENTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--runtimes", default="onnxruntime,openvino")
    args = p.parse_args(argv)
    print(f"CPU flags: {', '.join(cpu_flags())}; {args.size} px; {args.threads} thread(s)")
    print("| student | runtime | scheme | FP32 ms b1 / b32 | INT8 ms b1 / b32 | speed-up b1 | "
          "speed-up b32 | size ratio |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.students.split(","):
        for row in bench(name, args.size, args.threads, args.repeats, args.runtimes.split(",")):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
