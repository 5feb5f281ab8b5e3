"""FP32 vs INT8: accuracy, agreement, latency and size, with a pass / fail on the drop.

Accuracy is top-1 of the logits for a model with a head, else k-NN top-1 (DINO's weighted
vote, k=20, T=0.07) with a bank that each model embeds itself from the train split.
Agreement is the fraction of evaluation images with the same prediction; embeddings are
also compared by their mean cosine. Latency is the median of repeated ONNX Runtime runs at
each batch size with a stated thread count, after warm-up.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.edge.data import ImageSet
from train.edge.onnx_export import ort_session, run_onnx


@dataclass
class VerifySettings:
    """What is measured and what is accepted."""

    max_drop: float = 1.0
    """Largest accepted accuracy drop FP32 -> INT8, in points (top-1 or k-NN top-1)."""
    threads: int = 1
    """ONNX Runtime intra-op threads for the latency runs."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    """Batch sizes of the latency runs."""
    repeats: int = 20
    """Timed runs per batch size (the median is reported)."""
    warmup: int = 3
    """Untimed runs first."""
    knn_k: int = 20
    """Neighbours of the k-NN vote (embedding models)."""

    def __post_init__(self) -> None:
        if self.threads < 0 or self.repeats < 1 or self.warmup < 0 or self.knn_k < 1:
            raise ValueError("verify.threads >= 0, repeats >= 1, warmup >= 0, knn_k >= 1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("verify.batch_sizes must be a non-empty list of sizes >= 1")


def predictions(
    outputs_val: np.ndarray,
    kind: str,
    *,
    bank: np.ndarray | None = None,
    bank_labels: np.ndarray | None = None,
    num_classes: int | None = None,
    k: int = 20,
) -> np.ndarray:
    """Class predictions ``(N,)``: argmax of logits, or the k-NN vote over ``bank``."""
    if kind == "logits":
        return outputs_val.argmax(axis=1)
    if bank is None or bank_labels is None:
        raise ValueError("k-NN predictions need a bank and its labels")
    from train.evaluation.knn import topk_neighbours, vote

    classes = num_classes or int(bank_labels.max()) + 1
    sims, idx = topk_neighbours(
        torch.from_numpy(outputs_val).float(), torch.from_numpy(bank).float(), min(k, len(bank))
    )
    scores = vote(sims, torch.from_numpy(bank_labels).long()[idx], classes)
    return scores.argmax(dim=1).numpy()


def evaluate(
    path: Path, kind: str, val: ImageSet, train: ImageSet | None, k: int = 20
) -> dict[str, Any]:
    """Accuracy (percent) of one ONNX model and its raw outputs on ``val``."""
    sess = ort_session(path, threads=0)
    out = run_onnx(sess, val.images)
    bank = run_onnx(sess, train.images) if kind == "embedding" and train is not None else None
    num_classes = len(val.classes) if val.classes else None
    pred = predictions(
        out,
        kind,
        bank=bank,
        bank_labels=train.labels if train is not None else None,
        num_classes=num_classes,
        k=k,
    )
    return {"accuracy": 100.0 * float((pred == val.labels).mean()), "pred": pred, "out": out}


def latency_ms(path: Path, img_size: int, batch: int, threads: int, repeats: int, warmup: int):
    """Median and spread of ``repeats`` runs at one batch size (random input)."""
    sess = ort_session(path, threads=threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size), np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "images_per_s": batch / (statistics.median(times) / 1e3),
    }


def cpu_description() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return [f for f in wanted if f" {f}" in flags]


def verify(
    fp32: Path,
    int8: Path,
    kind: str,
    img_size: int,
    val: ImageSet,
    train: ImageSet | None,
    settings: VerifySettings | None = None,
    *,
    extra_models: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """The verification report (JSON-ready). ``report["passed"]`` is the drop check.

    ``extra_models``: other ONNX variants (e.g. QOperator / U8S8) timed beside the two.
    """
    s = settings or VerifySettings()
    models = {"fp32": Path(fp32), "int8": Path(int8), **(extra_models or {})}
    results = {name: evaluate(p, kind, val, train, s.knn_k) for name, p in models.items()}
    ref = results["fp32"]
    report: dict[str, Any] = {
        "task": "top-1 of the head" if kind == "logits" else f"k-NN top-1 (k={s.knn_k})",
        "output": kind,
        "eval_images": len(val),
        "bank_images": len(train) if (train is not None and kind == "embedding") else 0,
        "max_drop": s.max_drop,
        "threads": s.threads,
        "cpu": cpu_description(),
        "cpu_flags": cpu_flags(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu_count": os.cpu_count(),
        "models": {},
    }
    for name, p in models.items():
        r = results[name]
        cos = _mean_cosine(ref["out"], r["out"])
        entry: dict[str, Any] = {
            "file": p.name,
            "size_bytes": p.stat().st_size,
            "accuracy": r["accuracy"],
            "agreement": 100.0 * float((r["pred"] == ref["pred"]).mean()),
            "output_cosine": cos,
            "latency": {
                str(b): latency_ms(p, img_size, b, s.threads, s.repeats, s.warmup)
                for b in s.batch_sizes
            },
        }
        report["models"][name] = entry
    f, q = report["models"]["fp32"], report["models"]["int8"]
    report["drop"] = f["accuracy"] - q["accuracy"]
    report["size_ratio"] = f["size_bytes"] / q["size_bytes"]
    report["speedup"] = {
        b: f["latency"][b]["median_ms"] / q["latency"][b]["median_ms"] for b in f["latency"]
    }
    report["passed"] = bool(report["drop"] <= s.max_drop)
    return report


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def report_markdown(report: dict[str, Any], title: str = "FP32 vs INT8") -> str:
    """The report as a markdown section."""
    sizes = report["models"]["fp32"]["latency"].keys()
    lines = [
        f"## {title}",
        "",
        f"Task: {report['task']} on {report['eval_images']} images"
        + (f" (bank: {report['bank_images']} train images)" if report["bank_images"] else "")
        + ".",
        f"ONNX Runtime {report['onnxruntime']}, {report['threads']} thread(s), CPU: "
        f"{report['cpu']} (flags: {', '.join(report['cpu_flags']) or 'none of note'}).",
        "",
        "| model | size (KiB) | accuracy (%) | agreement (%) | output cosine | "
        + " | ".join(f"latency b={b} (ms)" for b in sizes)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for name, m in report["models"].items():
        lat = " | ".join(f"{m['latency'][b]['median_ms']:.2f}" for b in sizes)
        lines.append(
            f"| {name} (`{m['file']}`) | {m['size_bytes'] / 1024:.0f} | {m['accuracy']:.2f} | "
            f"{m['agreement']:.2f} | {m['output_cosine']:.4f} | {lat} |"
        )
    speed = ", ".join(f"batch {b}: {v:.2f}x" for b, v in report["speedup"].items())
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines += [
        "",
        f"Accuracy drop: {report['drop']:.2f} points (accepted: {report['max_drop']:.2f}) - "
        f"**{verdict}**. Size: {report['size_ratio']:.2f}x smaller. INT8 speed-up: {speed}.",
        "",
    ]
    return "\n".join(lines)
