"""``python -m vitssl.train.distil_report --encoder NAME=SPEC ... --train SHARDS --val SHARDS``.

Compares encoders side by side, typically the teacher, the distilled student and the same
student trained from scratch (SimCLR / BYOL) at an equal budget. For each ``NAME=SPEC`` (a run
directory, checkpoint or export, as ``vitssl.train.evaluate`` takes them):

* k-NN top-1/top-5 on frozen features (the evaluation suite: ``extract_features`` on the
  ``eval`` view + ``knn_classify``, DINO's weighted vote, k=20, T=0.07), and its percentage of
  the first encoder's (the teacher's) top-1;
* parameter count and forward FLOPs per image at the input size
  (``torch.utils.flop_counter``: 2 FLOPs per multiply-add of convolutions and matrix products);
* CPU latency in PyTorch (eager, float32, eval mode) at batch 1 and 32: median of ``--runs``
  timed forwards after warm-up, with ``--threads`` intra-op threads (stated in the report).

Writes ``<out>/distil_report.md`` and ``<out>/distil_report.json``. One process; the k-NN uses
the GPU when there is one. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def forward_flops(model: nn.Module, img_size: int) -> int:
    """FLOPs of one ``(1, 3, S, S)`` forward, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def cpu_latency_ms(
    model: nn.Module, img_size: int, batch: int, runs: int, threads: int, warmup: int = 3
) -> float:
    """Median wall time (ms) of ``runs`` float32 forwards of a ``(batch, 3, S, S)`` input."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.cpu().float().eval()
        x = torch.randn(batch, 3, img_size, img_size)
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(1000.0 * (time.perf_counter() - t0))
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def report(
    encoders: list[tuple[str, str]],
    train: str,
    val: str,
    out: Path,
    *,
    img_size: int | None = None,
    pool: str = "cls",
    k: int = 20,
    runs: int = 20,
    threads: int = 1,
    batches: tuple[int, ...] = (1, 32),
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every ``(name, spec)``; the first is the reference (teacher) of the ratio."""
    from vitssl.data_pipelines.labelled import LabelledReader
    from vitssl.models.students import count_parameters
    from vitssl.train.evaluation.encoders import load_encoder
    from vitssl.train.evaluation.features import extract_features
    from vitssl.train.evaluation.knn import knn_classify

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []
    for name, spec in encoders:
        enc = load_encoder(spec)
        size = img_size or enc.arch.img_size
        model = enc.model.to(device)
        feats = {}
        for split, source in (("train", train), ("val", val)):
            reader = LabelledReader(source, size, batch_size=128, limit=limit)
            feats[split] = extract_features(model, reader, device, pool)
        tr, va = feats["train"], feats["val"]
        knn = knn_classify(
            tr.feats, tr.labels, va.feats, va.labels, max(tr.num_classes, va.num_classes), k=k
        )
        row: dict[str, Any] = {
            "encoder": name,
            "model": enc.arch.name,
            "knn_top1": knn["distance/top1"],
            "knn_top5": knn["distance/top5"],
            "params_M": count_parameters(model) / 1e6,
            "GFLOPs": forward_flops(model, size) / 1e9,
        }
        for b in batches:
            row[f"cpu_ms_b{b}"] = cpu_latency_ms(model, size, b, runs, threads)
        row["img_size"] = size
        row["source"] = enc.source
        rows.append(row)
    ref = rows[0]["knn_top1"]
    for row in rows:
        row["knn_top1_vs_first_%"] = 100.0 * row["knn_top1"] / ref if ref else float("nan")
    settings = {
        "train": train,
        "val": val,
        "k": k,
        "pool": pool,
        "latency": f"median of {runs} runs, float32 eager PyTorch, {threads} thread(s)",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    write_report(rows, settings, out)
    return rows


def write_report(rows: list[dict[str, Any]], settings: dict[str, Any], out: Path) -> None:
    from vitssl.train.evaluation.results import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "distil_report.json").write_text(
        json.dumps({"rows": rows, "settings": settings}, indent=2) + "\n"
    )
    lines = [
        "# Distillation report",
        "",
        markdown_table([{k: v for k, v in r.items() if k != "source"} for r in rows]),
        "",
        *(f"- {k}: {v}" for k, v in settings.items()),
        *(f"- {r['encoder']}: {r['source']}" for r in rows),
        "",
    ]
    (out / "distil_report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitssl.train.distil_report",
        description="Teacher vs distilled vs from-scratch student: k-NN, params, FLOPs, latency.",
    )
    parser.add_argument(
        "--encoder",
        action="append",
        required=True,
        help="NAME=SPEC (run dir, checkpoint or export); the first is the teacher",
    )
    parser.add_argument("--train", required=True, help="labelled shards of the k-NN bank")
    parser.add_argument("--val", required=True, help="labelled shards of the k-NN queries")
    parser.add_argument("--out", type=Path, default=Path("runs/distil_report"))
    parser.add_argument("--img-size", type=int, default=None, help="default: each encoder's")
    parser.add_argument("--pool", choices=("cls", "avg"), default="cls", help="ViT pooling")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per batch size")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each split")
    args = parser.parse_args(argv)
    try:
        pairs = []
        for item in args.encoder:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise ValueError(f"--encoder {item!r} is not NAME=SPEC")
            pairs.append((name, spec))
        rows = report(
            pairs,
            args.train,
            args.val,
            args.out,
            img_size=args.img_size,
            pool=args.pool,
            k=args.k,
            runs=args.runs,
            threads=args.threads,
            limit=args.limit,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from vitssl.train.evaluation.results import markdown_table

    print(markdown_table([{k: v for k, v in r.items() if k != "source"} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
