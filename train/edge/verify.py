"""FP32 vs INT8: accuracy, agreement, latency and size, judged on every count.

Accuracy is top-1 of the logits for a model with a head, else k-NN top-1 (DINO's weighted
vote, k=20, T=0.07) with a bank that each model embeds itself from the train split.
Agreement is the fraction of evaluation images with the same prediction; embeddings are
also compared by their mean cosine. Latency is the median of repeated runs at each batch
size with a stated thread count, after warm-up, on each runtime (ONNX Runtime first: the
target; OpenVINO reading the same files when listed and installed).

Several INT8 candidates (schemes) may be verified side by side; :func:`verify` keeps the
fastest that meets the accuracy bounds. The verdict passes only when the FP32 model is well
above chance, the drop is within ``max_drop``, the agreement (classifier) or mean cosine
(embedding) meets its bound and INT8 is at least ``min_speedup`` times as fast as FP32 at
every batch size on the target runtime; ``report["checks"]`` lists each with its value.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitssl.train.edge.data import ImageSet

RUNTIMES = ("onnxruntime", "openvino")


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
    min_cosine: float = 0.98
    """Smallest accepted mean cosine INT8 vs FP32 embedding (embedding models)."""
    min_agreement: float = 95.0
    """Smallest accepted top-1 agreement INT8 vs FP32, percent (models with a head)."""
    min_speedup: float = 1.0
    """INT8 must be this many times as fast as FP32 at every batch size on the target
    runtime (1.0: never slower; 0 is the explicit override that ships a slower model)."""
    min_over_chance: float = 10.0
    """FP32 accuracy must exceed chance (100 / classes) by this many points: a model at
    chance agrees with anything, and its drop says nothing."""
    runtimes: list[str] = field(default_factory=lambda: ["onnxruntime"])
    """Runtimes verified and timed; the first is the target of the verdict and the choice
    of scheme (onnxruntime or openvino)."""

    def __post_init__(self) -> None:
        if not self.runtimes or any(r not in RUNTIMES for r in self.runtimes):
            raise ValueError(f"verify.runtimes must be a non-empty list from {RUNTIMES}")
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError("verify.runtimes lists a runtime twice")
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
    from vitssl.train.evaluation.knn import topk_neighbours, vote

    classes = num_classes or int(bank_labels.max()) + 1
    sims, idx = topk_neighbours(
        torch.from_numpy(outputs_val).float(), torch.from_numpy(bank).float(), min(k, len(bank))
    )
    scores = vote(sims, torch.from_numpy(bank_labels).long()[idx], classes)
    return scores.argmax(dim=1).numpy()


def run_model(path: Path, images: np.ndarray, runtime: str = "onnxruntime", batch: int = 64):
    """Outputs ``(N, ...)`` of a model file over ``images (N, 3, S, S)`` on ``runtime``."""
    from vitssl.train.edge.infer import Runner

    run = Runner(Path(path), runtime, threads=0).run
    outs = [
        run(np.ascontiguousarray(images[i : i + batch], np.float32))
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(outs)


def evaluate(
    path: Path,
    kind: str,
    val: ImageSet,
    train: ImageSet | None,
    k: int = 20,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Accuracy (percent) of one model file and its raw outputs on ``val``."""
    out = run_model(path, val.images, runtime)
    bank = run_model(path, train.images, runtime) if kind == "embedding" and train else None
    pred = predictions(
        out,
        kind,
        bank=bank,
        bank_labels=train.labels if train is not None else None,
        num_classes=num_classes(val),
        k=k,
    )
    return {"accuracy": 100.0 * float((pred == val.labels).mean()), "pred": pred, "out": out}


def num_classes(val: ImageSet) -> int:
    return len(val.classes) if val.classes else int(val.labels.max()) + 1


def latency_ms(
    path: Path,
    img_size: int,
    batch: int,
    threads: int,
    repeats: int,
    warmup: int,
    runtime: str = "onnxruntime",
) -> dict[str, float]:
    """Median and spread of ``repeats`` runs at one batch size (random input) on ``runtime``
    (``onnxruntime`` or ``openvino``, through the artefact's own ``infer.Runner``)."""
    from vitssl.train.edge.infer import Runner

    run = Runner(Path(path), runtime, threads).run
    x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size), np.float32)
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
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


def _entry(path: Path, r: dict[str, Any], ref: dict[str, Any], img_size: int, s, runtime):
    return {
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "accuracy": r["accuracy"],
        "agreement": 100.0 * float((r["pred"] == ref["pred"]).mean()),
        "output_cosine": _mean_cosine(ref["out"], r["out"]),
        "latency": {
            str(b): latency_ms(path, img_size, b, s.threads, s.repeats, s.warmup, runtime)
            for b in s.batch_sizes
        },
    }


def _compare(fp: dict[str, Any], q: dict[str, Any]) -> dict[str, Any]:
    """Drop, size ratio and per-batch speed-up of one INT8 entry against FP32."""
    speed = {b: fp["latency"][b]["median_ms"] / q["latency"][b]["median_ms"] for b in fp["latency"]}
    return {
        "drop": fp["accuracy"] - q["accuracy"],
        "size_ratio": fp["size_bytes"] / q["size_bytes"],
        "speedup": speed,
    }


def _accurate(c: dict[str, Any], kind: str, s: VerifySettings) -> bool:
    close = c["output_cosine"] >= s.min_cosine if kind == "embedding" else True
    agree = c["agreement"] >= s.min_agreement if kind == "logits" else True
    return bool(c["drop"] <= s.max_drop and close and agree)


def choose(schemes: dict[str, dict[str, Any]], kind: str, s: VerifySettings) -> str:
    """The fastest scheme (geometric mean of its speed-ups) among those meeting the accuracy
    bounds; the most accurate one when none does (the verdict then fails)."""
    ok = [n for n, c in schemes.items() if _accurate(c, kind, s)]
    if not ok:
        return min(schemes, key=lambda n: schemes[n]["drop"])
    return max(ok, key=lambda n: math.prod(schemes[n]["speedup"].values()))


def checks(report: dict[str, Any], kind: str, s: VerifySettings) -> list[dict[str, Any]]:
    """Every condition of the verdict with its measured value (``passed`` each)."""
    fp, q = report["models"]["fp32"], report["models"]["int8"]
    chance = 100.0 / report["num_classes"]
    out = [
        {
            "check": "FP32 accuracy above chance",
            "value": fp["accuracy"],
            "bound": f">= {chance + s.min_over_chance:.2f} (chance {chance:.2f} + "
            f"{s.min_over_chance})",
            "passed": bool(fp["accuracy"] >= chance + s.min_over_chance),
        },
        {
            "check": "accuracy drop (points)",
            "value": report["drop"],
            "bound": f"<= {s.max_drop}",
            "passed": bool(report["drop"] <= s.max_drop),
        },
    ]
    if kind == "embedding":
        value, bound, name = q["output_cosine"], s.min_cosine, "mean cosine INT8 vs FP32"
    else:
        value, bound, name = q["agreement"], s.min_agreement, "top-1 agreement INT8 vs FP32 (%)"
    out.append(
        {"check": name, "value": value, "bound": f">= {bound}", "passed": bool(value >= bound)}
    )
    for b, v in report["speedup"].items():
        out.append(  # one check per batch size
            {
                "check": f"INT8 speed-up at batch {b} ({report['runtime']})",
                "value": v,
                "bound": f">= {s.min_speedup}",
                "passed": bool(v >= s.min_speedup),
            }
        )
    for c in out:
        c["value"] = float(c["value"])
    return out


def verify(
    fp32: Path,
    int8: Path | dict[str, Path],
    kind: str,
    img_size: int,
    val: ImageSet,
    train: ImageSet | None,
    settings: VerifySettings | None = None,
    *,
    extra_models: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """The verification report (JSON-ready); ``report["passed"]`` is the verdict.

    ``int8``: one INT8 model, or candidates by scheme name, of which the fastest accurate
    one is chosen (``report["scheme"]``, ``report["schemes"]`` for all).
    ``extra_models``: other variants (e.g. QOperator) reported beside them, never chosen.
    """
    s = settings or VerifySettings()
    candidates = {"int8": Path(int8)} if isinstance(int8, (str, Path)) else dict(int8)
    target = s.runtimes[0]
    ref = evaluate(Path(fp32), kind, val, train, s.knn_k, target)
    fp = _entry(Path(fp32), ref, ref, img_size, s, target)
    schemes = {}
    for name, path in candidates.items():
        r = evaluate(path, kind, val, train, s.knn_k, target)
        e = _entry(Path(path), r, ref, img_size, s, target)
        schemes[name] = {**e, **_compare(fp, e)}
    chosen = choose(schemes, kind, s)
    report: dict[str, Any] = {
        "task": "top-1 of the head" if kind == "logits" else f"k-NN top-1 (k={s.knn_k})",
        "output": kind,
        "eval_images": len(val),
        "bank_images": len(train) if (train is not None and kind == "embedding") else 0,
        "num_classes": num_classes(val),
        "output_dim": int(ref["out"].shape[1]),
        "max_drop": s.max_drop,
        "threads": s.threads,
        "runtime": target,
        "cpu": cpu_description(),
        "cpu_flags": cpu_flags(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu_count": os.cpu_count(),
        "scheme": chosen,
        "schemes": {n: {k: v for k, v in c.items() if k != "latency"} for n, c in schemes.items()},
        "models": {"fp32": fp, "int8": {**schemes[chosen], "scheme": chosen}},
    }
    for name, path in (extra_models or {}).items():
        r = evaluate(path, kind, val, train, s.knn_k, target)
        report["models"][name] = _entry(Path(path), r, ref, img_size, s, target)
    report.update(_compare(fp, report["models"]["int8"]))
    report["runtimes"] = {
        rt: _other_runtime(Path(fp32), candidates[chosen], kind, img_size, val, train, s, rt)
        for rt in s.runtimes[1:]
    }
    report["accurate"] = _accurate(report["models"]["int8"], kind, s)
    report["checks"] = checks(report, kind, s)
    for rt, r in report["runtimes"].items():
        if "skipped" in r:
            continue
        report["checks"].append(
            {
                "check": f"accuracy drop on {rt} (points)",
                "value": r["drop"],
                "bound": f"<= {s.max_drop}",
                "passed": bool(r["drop"] <= s.max_drop),
            }
        )
    failed = [c["check"] for c in report["checks"] if not c["passed"]]
    report["passed"] = not failed
    report["verdict"] = "PASSED" if not failed else "FAILED: " + "; ".join(failed)
    return report


def _other_runtime(fp32, int8, kind, img_size, val, train, s, runtime) -> dict[str, Any]:
    """The same two files verified and timed on another runtime (skipped, and said so, when
    that runtime is not installed: it is an optional extra)."""
    import importlib.util

    if importlib.util.find_spec(runtime) is None:
        return {"skipped": f"{runtime} is not installed (pip install -e .[{runtime}])"}
    version = __import__(runtime).__version__
    ref = evaluate(fp32, kind, val, train, s.knn_k, runtime)
    fp = _entry(fp32, ref, ref, img_size, s, runtime)
    q = _entry(Path(int8), evaluate(Path(int8), kind, val, train, s.knn_k, runtime), ref,
               img_size, s, runtime)  # fmt: skip
    return {"version": version, "models": {"fp32": fp, "int8": q}, **_compare(fp, q)}


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def _table(models: dict[str, dict[str, Any]], sizes: list[str]) -> list[str]:
    lines = [
        "| model | size (KiB) | accuracy (%) | agreement (%) | output cosine | "
        + " | ".join(f"latency b={b} (ms)" for b in sizes)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for name, m in models.items():
        lat = " | ".join(f"{m['latency'][b]['median_ms']:.2f}" for b in sizes)
        lines.append(
            f"| {name} (`{m['file']}`) | {m['size_bytes'] / 1024:.0f} | {m['accuracy']:.2f} | "
            f"{m['agreement']:.2f} | {m['output_cosine']:.4f} | {lat} |"
        )
    return lines


def report_markdown(report: dict[str, Any], title: str = "FP32 vs INT8") -> str:
    """The report as a markdown section."""
    sizes = list(report["models"]["fp32"]["latency"].keys())
    lines = [
        f"## {title}",
        "",
        f"Task: {report['task']} on {report['eval_images']} images"
        + (f" (bank: {report['bank_images']} train images)" if report["bank_images"] else "")
        + ".",
        f"Target runtime {report['runtime']} (ONNX Runtime {report['onnxruntime']}), "
        f"{report['threads']} thread(s), CPU: {report['cpu']} "
        f"(flags: {', '.join(report['cpu_flags']) or 'none of note'}).",
        "",
        *_table(report["models"], sizes),
        "",
    ]
    if len(report.get("schemes", {})) > 1:
        lines += ["Schemes measured side by side (the fastest meeting the bounds ships):", ""]
        lines += ["| scheme | accuracy (%) | drop | cosine | agreement (%) | speed-up | size |"]
        lines += ["| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
        for n, c in report["schemes"].items():
            sp = ", ".join(f"b{b}: {v:.2f}x" for b, v in c["speedup"].items())
            mark = " (shipped)" if n == report["scheme"] else ""
            lines.append(
                f"| {n}{mark} | {c['accuracy']:.2f} | {c['drop']:.2f} | "
                f"{c['output_cosine']:.4f} | {c['agreement']:.2f} | {sp} | "
                f"{c['size_ratio']:.2f}x |"
            )
        lines.append("")
    for rt, r in report.get("runtimes", {}).items():
        if "skipped" in r:
            lines += [f"{rt}: skipped, {r['skipped']}.", ""]
            continue
        sp = ", ".join(f"batch {b}: {v:.2f}x" for b, v in r["speedup"].items())
        lines += [f"Same files on {rt} {r['version']}:", "", *_table(r["models"], sizes), ""]
        lines += [f"Drop {r['drop']:.2f} points; INT8 speed-up {sp}.", ""]
    speed = ", ".join(f"batch {b}: {v:.2f}x" for b, v in report["speedup"].items())
    lines += ["| check | value | bound | passed |", "| --- | ---: | --- | --- |"]
    for c in report["checks"]:
        lines.append(f"| {c['check']} | {c['value']:.4g} | {c['bound']} | {c['passed']} |")
    lines += [
        "",
        f"Scheme {report['scheme']}: drop {report['drop']:.2f} points (accepted: "
        f"{report['max_drop']:.2f}), {report['size_ratio']:.2f}x smaller, INT8 speed-up "
        f"{speed}. **{report['verdict']}**",
        "",
    ]
    return "\n".join(lines)
