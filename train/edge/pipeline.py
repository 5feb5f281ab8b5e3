"""The whole chain in one command: pretrain -> evaluate -> distil -> export, then a report.

``python -m train.export pipeline RECIPE [key=value ...]`` (recipe
``train/recipes/export_pipeline_*.toml``). Every stage is a config-driven command run as a
subprocess (``python -m train.pretrain``, ``python -m train.evaluate knn``, ``python -m
train.distil``), each writing into ``<output_dir>/<stage>``; the export of each model (the
pretrained encoder and, when distillation ran, the student) runs in this process.
Stage overrides may use ``{out}`` (the stage's directory), ``{encoder}`` (the pretrained
encoder) and ``{root}`` (the pipeline's directory). Every enabled stage's recipe is checked
before the first stage runs, so a wrong name fails at once with one line.

The final ``report.md`` gathers every stage's numbers, with PNG plots: the loss curves of
each stage's ``metrics.jsonl``, accuracy at each stage, latency and size of each export.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.config import ConfigError, build_dataclass, load_raw, resolve_recipe_path


@dataclass
class StageSection:
    """One stage: a recipe plus dotted overrides (``{out}``, ``{encoder}``, ``{root}``)."""

    enabled: bool = True
    """Run this stage."""
    recipe: str = ""
    """Recipe file or name in train/recipes/."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides passed to the stage's command."""
    result: str = ""
    """The encoder the stage produces (distil: the student); default ``{out}``."""


@dataclass
class PipelineConfig:
    """The chain; ``checkpoint`` skips pretraining and starts from an existing encoder."""

    output_dir: str = "runs/pipeline_demo"
    """Every stage writes into a sub-directory of this one."""
    checkpoint: str = ""
    """Start from this encoder (run dir, checkpoint, encoder.safetensors) instead of pretraining."""
    pretrain: StageSection = field(default_factory=StageSection)
    evaluate: StageSection = field(default_factory=StageSection)
    distil: StageSection = field(default_factory=StageSection)
    export: StageSection = field(default_factory=StageSection)
    export_teacher: bool = True
    """Also export (and measure) the pretrained encoder, not only the student."""


def load_pipeline_config(recipe: str | None, overrides: list[str]) -> PipelineConfig:
    return build_dataclass(PipelineConfig, load_raw(recipe, overrides), "")


def _fill(items: list[str], **values: str) -> list[str]:
    return [s.format(**values) for s in items]


def _run(name: str, cmd: list[str], log: Path) -> int:
    print(f"[pipeline] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(f"[pipeline] {name}: exit {code} in {time.time() - t0:.0f} s (log: {log})", flush=True)
    return code


def check_recipes(cfg: PipelineConfig) -> None:
    """Raise ConfigError naming the first enabled stage whose recipe does not resolve."""
    for name in ("pretrain", "evaluate", "distil", "export"):
        section: StageSection = getattr(cfg, name)
        if not section.enabled or (name == "pretrain" and cfg.checkpoint):
            continue
        try:
            resolve_recipe_path(section.recipe)
        except ConfigError as e:
            raise ConfigError(f"pipeline stage {name}: {e}") from None


def run_pipeline(cfg: PipelineConfig, accept_drop: bool = False) -> int:
    """Run every enabled stage; returns 0, the first failing stage's code, or 3 (drop)."""
    from train.edge.config import load_export_config
    from train.edge.run import EXIT_DROP, run_export

    check_recipes(cfg)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    stages: dict[str, dict[str, Any]] = {}
    encoder = cfg.checkpoint
    if not encoder:
        out = root / "pretrain"
        args = [
            *_fill(cfg.pretrain.overrides, out=str(out), root=str(root), encoder=""),
            f"train.output_dir={out}",
        ]
        code = _run(
            "pretrain",
            [py, "-m", "train.pretrain", cfg.pretrain.recipe, *args],
            root / "pretrain.log",
        )
        if code:
            return code
        encoder = str(out)
        stages["pretrain"] = {"dir": str(out)}
    if cfg.evaluate.enabled:
        out = root / "evaluate"
        args = [
            *_fill(cfg.evaluate.overrides, out=str(out), root=str(root), encoder=encoder),
            f"encoder.checkpoint={encoder}",
            f"output_dir={out}",
        ]
        code = _run(
            "evaluate",
            [py, "-m", "train.evaluate", "knn", cfg.evaluate.recipe, *args],
            root / "evaluate.log",
        )
        if code:
            return code
        stages["evaluate"] = {"dir": str(out)}
    student = ""
    if cfg.distil.enabled:
        out = root / "distil"
        args = _fill(cfg.distil.overrides, out=str(out), root=str(root), encoder=encoder)
        code = _run(
            "distil", [py, "-m", "train.distil", cfg.distil.recipe, *args], root / "distil.log"
        )
        if code:
            return code
        student = (cfg.distil.result or "{out}").format(out=out, root=root, encoder=encoder)
        stages["distil"] = {"dir": str(out), "student": student}
    exports: dict[str, dict[str, Any]] = {}
    targets = [("teacher", encoder)] if cfg.export_teacher or not student else []
    targets += [("student", student)] if student else []
    worst = 0
    for name, spec in targets:
        out = root / f"artefact_{name}"
        ecfg = load_export_config(
            cfg.export.recipe,
            [
                *_fill(cfg.export.overrides, out=str(out), root=str(root), encoder=spec),
                f"model.checkpoint={spec}",
                f"output_dir={out}",
            ],
        )
        report = run_export(ecfg)
        exports[name] = {"dir": str(out), "report": report}
        if not report["passed"] and not accept_drop:
            worst = EXIT_DROP
    write_report(root, stages, exports)
    return worst


# ---------------------------------------------------------------- report and plots


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row and "step" in row:
            rows.append(row)
    return rows


def _knn_top1(eval_dir: Path) -> float | None:
    f = eval_dir / "knn.json"
    if not f.is_file():
        return None
    rows = json.loads(f.read_text()).get("results", [])
    for row in rows:
        if "random" in str(row.get("encoder", "")).lower():
            continue
        for k, v in row.items():
            if "top1" in k and isinstance(v, (int, float)):
                return float(v)
    return None


def write_report(root: Path, stages: dict[str, Any], exports: dict[str, Any]) -> Path:
    """``report.md`` and ``losses.png``, ``accuracy.png``, ``latency_size.png`` in ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root.mkdir(parents=True, exist_ok=True)
    lines = ["# Pipeline report", ""]
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for name in ("pretrain", "distil"):
        rows = read_metrics(Path(stages.get(name, {}).get("dir", "/nonexistent")) / "metrics.jsonl")
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
            plotted = True
            lines.append(
                f"- {name}: {len(rows)} logged steps, loss {rows[0]['loss']:.4f} -> "
                f"{rows[-1]['loss']:.4f} ({stages[name]['dir']})"
            )
    if plotted:
        ax.set(xlabel="step", ylabel="loss", title="training losses")
        ax.legend()
        fig.savefig(root / "losses.png", dpi=100, bbox_inches="tight")
        lines += ["", "![losses](losses.png)", ""]
    plt.close(fig)

    acc: dict[str, float] = {}
    if "evaluate" in stages:
        top1 = _knn_top1(Path(stages["evaluate"]["dir"]))
        if top1 is not None:
            acc["pretrained (k-NN, PyTorch)"] = top1
    for name, e in exports.items():
        r = e["report"]
        acc[f"{name} FP32 ONNX"] = r["models"]["fp32"]["accuracy"]
        acc[f"{name} INT8 ONNX"] = r["models"]["int8"]["accuracy"]
    lines += ["## Accuracy at each stage", "", "| stage | accuracy (%) |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in acc.items()]
    if acc:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.barh(list(acc), list(acc.values()))
        ax.set(xlabel="top-1 (%)", title="accuracy at each stage")
        fig.savefig(root / "accuracy.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        lines += ["", "![accuracy](accuracy.png)", ""]

    if exports:
        lines += [
            "## Latency and size of each export",
            "",
            "| model | size (KiB) | latency b=1 (ms) | latency b=32 (ms) | passed |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        names, sizes, lat = [], [], []
        for name, e in exports.items():
            r = e["report"]
            for prec in ("fp32", "int8"):
                m = r["models"][prec]
                b = list(m["latency"])
                names.append(f"{name} {prec}")
                sizes.append(m["size_bytes"] / 1024)
                lat.append(m["latency"][b[-1]]["median_ms"])
                cells = " | ".join(f"{m['latency'][k]['median_ms']:.2f}" for k in b[:2])
                lines.append(f"| {name} {prec} | {sizes[-1]:.0f} | {cells} | {r['passed']} |")
            lines.append(f"\nArtefact: `{e['dir']}` (see its report.md and MODEL_CARD.md)\n")
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].barh(names, sizes)
        axes[0].set(xlabel="KiB", title="model size")
        axes[1].barh(names, lat)
        axes[1].set(xlabel="ms (largest batch)", title="ONNX Runtime latency")
        fig.savefig(root / "latency_size.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        lines += ["", "![latency and size](latency_size.png)", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"[pipeline] report: {path}", flush=True)
    return path
