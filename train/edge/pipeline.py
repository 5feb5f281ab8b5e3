"""The whole chain in one command: pretrain -> evaluate -> distil -> export, then a report.

``python -m vitssl.train.edge_export pipeline RECIPE [key=value ...]`` (recipe
``train/recipes/export_pipeline_*.toml``). Every stage is a config-driven command run as a
subprocess (``python -m vitssl.train.pretrain``, ``... evaluate knn``, ``... distil``),
each writing into ``<output_dir>/<stage>``; the export of each model (the
pretrained encoder and, when distillation ran, the student) runs in this process.
Stage overrides may use ``{out}`` (the stage's directory), ``{encoder}`` (the pretrained
encoder) and ``{root}`` (the pipeline's directory). Every enabled stage's recipe is checked
before the first stage runs, so a wrong name fails at once with one line.

The final ``report.md`` gathers every stage's numbers, with PNG plots: the loss curves of
each stage's ``metrics.jsonl``, accuracy at each stage, latency and size of each export.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitssl.train.cli import EXIT_OK, EXIT_REQUEUE, EXIT_STAGE, EXIT_USAGE, EXIT_VERIFY
from vitssl.train.config import ConfigError, build_dataclass, load_raw, resolve_recipe_path

log = logging.getLogger(__name__)


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


def _last_line(log: Path) -> str:
    """The reason a stage gave: the last non-empty line of its log."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {log}"
    return lines[-1] if lines else "no output"


@dataclass
class StageResult:
    """What one stage did: its exit code, time, log and (when it failed) why."""

    name: str
    code: int
    seconds: float
    log: str
    why: str = ""


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


class _Chain:
    """Runs the stages one after another, recording each one's :class:`StageResult`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results: list[StageResult] = []
        self.stages: dict[str, dict[str, Any]] = {}
        self.exports: dict[str, dict[str, Any]] = {}

    def command(self, name: str, module: str, args: list[str]) -> bool:
        """Run ``python -m module args`` into ``<root>/<name>.log``; True when it succeeded."""
        cmd = [sys.executable, "-m", module, *args]
        log_file = self.root / f"{name}.log"
        log.info(f"[pipeline] {name}: {' '.join(cmd)}")
        t0 = time.time()
        with open(log_file, "w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.time() - t0
        log.info(f"[pipeline] {name}: exit {code} in {seconds:.0f} s (log: {log_file})")
        why = _last_line(log_file) if code else ""
        self.results.append(StageResult(name, code, seconds, str(log_file), why))
        return code == 0

    def export(self, name: str, ecfg: Any) -> dict[str, Any] | None:
        """The export of one model, in this process; None (and a logged traceback) on failure."""
        from vitssl.train.edge.run import run_export

        log_file = self.root / f"export_{name}.log"
        t0 = time.time()
        try:
            report = run_export(ecfg)
        except Exception as e:  # recorded in the report: the chain reports every failure
            log_file.write_text(traceback.format_exc())
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            code = EXIT_USAGE if isinstance(e, ValueError) else 1  # what the CLI would exit with
            seconds = time.time() - t0
            self.results.append(StageResult(f"export {name}", code, seconds, str(log_file), why))
            log.info(f"[pipeline] export {name} failed: {why} (traceback: {log_file})")
            return None
        code = 0 if report["passed"] else EXIT_VERIFY
        why = "" if report["passed"] else report["verdict"]  # names every failed check
        self.results.append(StageResult(f"export {name}", code, time.time() - t0, "", why))
        return report

    def finish(self, code: int) -> int:
        """Write the report (always) and return ``code``."""
        write_report(self.root, self.stages, self.exports, self.results)
        return code


def _export_config(cfg: PipelineConfig, root: Path, name: str, spec: str) -> Any:
    """The export stage's config for one model (``spec``: its encoder)."""
    from vitssl.train.edge.config import load_export_config

    out = root / f"artefact_{name}"
    return load_export_config(
        cfg.export.recipe,
        [
            *_fill(cfg.export.overrides, out=str(out), root=str(root), encoder=spec),
            f"model.checkpoint={spec}",
            f"output_dir={out}",
        ],
    )


def _stage_exit(chain: _Chain) -> int:
    """A failed stage's code for the pipeline: 75 stays (run again to resume), else 4."""
    return EXIT_REQUEUE if chain.results[-1].code == EXIT_REQUEUE else EXIT_STAGE


def run_pipeline(cfg: PipelineConfig, accept_drop: bool = False) -> int:
    """Run every enabled stage and write ``report.md`` whatever happens.

    Returns 0, 2 (this configuration is wrong: nothing ran), 3 (an INT8 model lost more
    than its accepted drop), 4 (a stage failed: the report says which and why) or 75 (a
    stage was stopped by a signal after a checkpoint: run the same command to resume).
    """
    check_recipes(cfg)
    root = Path(cfg.output_dir)
    _export_config(cfg, root, "teacher", cfg.checkpoint or str(root / "pretrain"))  # a check
    root.mkdir(parents=True, exist_ok=True)
    chain = _Chain(root)
    encoder = cfg.checkpoint
    if not encoder:
        out = root / "pretrain"
        args = [
            *_fill(cfg.pretrain.overrides, out=str(out), root=str(root), encoder=""),
            f"train.output_dir={out}",
        ]
        chain.stages["pretrain"] = {"dir": str(out)}
        if not chain.command("pretrain", "vitssl.train.pretrain", [cfg.pretrain.recipe, *args]):
            return chain.finish(_stage_exit(chain))
        encoder = str(out)
    if cfg.evaluate.enabled:
        out = root / "evaluate"
        args = [
            "knn",
            cfg.evaluate.recipe,
            *_fill(cfg.evaluate.overrides, out=str(out), root=str(root), encoder=encoder),
            f"encoder.checkpoint={encoder}",
            f"output_dir={out}",
        ]
        chain.stages["evaluate"] = {"dir": str(out)}
        if not chain.command("evaluate", "vitssl.train.evaluate", args):
            return chain.finish(_stage_exit(chain))
    student = ""
    if cfg.distil.enabled:
        out = root / "distil"
        args = _fill(cfg.distil.overrides, out=str(out), root=str(root), encoder=encoder)
        chain.stages["distil"] = {"dir": str(out)}
        if not chain.command("distil", "vitssl.train.distil", [cfg.distil.recipe, *args]):
            return chain.finish(_stage_exit(chain))
        student = (cfg.distil.result or "{out}").format(out=out, root=root, encoder=encoder)
        chain.stages["distil"]["student"] = student
    targets = [("teacher", encoder)] if cfg.export_teacher or not student else []
    targets += [("student", student)] if student else []
    worst = EXIT_OK
    for name, spec in targets:
        report = chain.export(name, _export_config(cfg, root, name, spec))
        if report is None:
            return chain.finish(EXIT_STAGE)
        chain.exports[name] = {"dir": str(root / f"artefact_{name}"), "report": report}
        if not report["passed"] and not accept_drop:
            worst = EXIT_VERIFY
    return chain.finish(worst)


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


def _stage_lines(results: list[StageResult]) -> list[str]:
    """The stages table, and which stage failed and why."""
    lines = [
        "## Stages",
        "",
        "| stage | exit code | time (s) | log |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [f"| {r.name} | {r.code} | {r.seconds:.0f} | {r.log} |" for r in results]
    failed = [r for r in results if r.code]
    for r in failed:
        lines += ["", f"**Stage `{r.name}` failed** (exit code {r.code}): {r.why}"]
    if not failed:
        lines += ["", "Every stage succeeded."]
    return [*lines, ""]


def write_report(
    root: Path,
    stages: dict[str, Any],
    exports: dict[str, Any],
    results: list[StageResult] | None = None,
) -> Path:
    """``report.md`` and ``losses.png``, ``accuracy.png``, ``latency_size.png`` in ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root.mkdir(parents=True, exist_ok=True)
    lines = ["# Pipeline report", "", *_stage_lines(results or [])]
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
    log.info(f"[pipeline] report: {path}")
    return path
