"""The export stage: FP32 ONNX (+ TorchScript) -> INT8 (ORT) -> verification -> artefact.

:func:`run_export` does it all for one model; when the INT8 model loses more than
``verify.max_drop`` and ``qat.enabled``, a short quantization-aware fine-tune is run and the
model exported and quantized again. Returns the report (``report["passed"]``).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitssl.train.edge import artefact, quantize_ort, sensitivity
from vitssl.train.edge.config import ExportConfig
from vitssl.train.edge.data import ImageSet, load_images
from vitssl.train.edge.onnx_export import export_onnx, export_torchscript, load_inference_model
from vitssl.train.edge.quantize_ort import QuantSettings, float_nodes, quantize_int8
from vitssl.train.edge.verify import report_markdown, verify

log = logging.getLogger(__name__)
EXIT_DROP = 3
"""Exit code when the INT8 model loses more than the accepted drop."""


def _variants(cfg: ExportConfig, fp32: Path, calib: Any, out: Path, kind: str) -> dict[str, Path]:
    """QOperator and U8S8 twins of the main INT8 model, for the format comparison."""
    made = {}
    for fmt in quantize_ort.FORMATS:
        for act in quantize_ort.ACTIVATION_TYPES:
            if fmt == cfg.quant.format and act == cfg.quant.activation_type:
                continue
            s = QuantSettings(**{**cfg.quant.__dict__, "format": fmt, "activation_type": act})
            name = f"int8_{fmt}_{'s8s8' if act == 'int8' else 'u8s8'}"
            path = out / "variants" / f"{name}.onnx"
            made[name] = quantize_int8(fp32, path, calib.images, s, kind=kind)
    return made


def _quantize_schemes(
    fp32: Path, images: Any, settings: QuantSettings, out: Path, kind: str
) -> dict[str, Path]:
    """One INT8 model per scheme of ``settings.schemes`` (or the settings as given)."""
    if not settings.schemes:
        path = out / "schemes" / f"model.int8.{settings.scheme}.onnx"
        return {settings.scheme: quantize_int8(fp32, path, images, settings, kind=kind)}
    return {
        name: quantize_int8(
            fp32,
            out / "schemes" / f"model.int8.{name}.onnx",
            images,
            settings.for_scheme(name),
            kind=kind,
        )
        for name in settings.schemes
    }


def run_export(
    cfg: ExportConfig,
    *,
    model: nn.Module | None = None,
    img_size: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Build the artefact of ``cfg.output_dir``; ``model`` (an InferenceModel-like module,
    ``images -> embedding or logits``, with ``output_kind``) replaces ``cfg.model``."""
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, img_size = load_inference_model(
            cfg.model.checkpoint, cfg.model.pool, cfg.model.img_size, cfg.model.patch_size
        )
        source = cfg.model.checkpoint
    assert img_size is not None
    model.eval()
    kind = getattr(model, "output_kind", "embedding")
    calib, val, train = _load_data(cfg, img_size, kind)

    fp32 = out / "model.fp32.onnx"
    exported = export_onnx(
        model, fp32, img_size, exporter=cfg.exporter, opset=cfg.opset, rtol=cfg.fp32_rtol
    )
    log.info(f"FP32 ONNX ({exported.exporter}) max |diff| vs PyTorch {exported.max_abs_diff:.2e}")
    ts = (
        export_torchscript(model, out / "model.fp32.pt", img_size, rtol=cfg.fp32_rtol)
        if cfg.torchscript
        else None
    )

    settings = QuantSettings(**cfg.quant.__dict__)
    sens = _sensitivity(cfg, fp32, calib, val, kind, settings, out)
    candidates = _quantize_schemes(fp32, calib.images, settings, out, kind)
    variants = _variants(cfg, fp32, calib, out, kind) if cfg.compare_formats else {}
    report = verify(fp32, candidates, kind, img_size, val, train, cfg.verify, extra_models=variants)
    if len(candidates) > 1:
        settings = settings.for_scheme(report["scheme"])
    int8 = out / "model.int8.onnx"
    shutil.copyfile(candidates[report["scheme"]], int8)
    log.info(
        f"INT8 {report['scheme']}: drop {report['drop']:.2f} points, speed-up "
        + ", ".join(f"b{b} {v:.2f}x" for b, v in report["speedup"].items())
        + f": {report['verdict']}"
    )

    qat_info: dict[str, Any] | None = None
    if not report["accurate"] and cfg.qat.enabled:
        report, qat_info = _recover_with_qat(
            cfg, model, img_size, kind, calib, val, train, settings, out, report
        )
    pt2e_info = _pt2e(model, calib, val, train, kind, img_size) if cfg.pt2e else None

    meta = _meta(cfg, out, source, model, img_size, exported, settings, report, int8, t0)
    if sens is not None:
        meta["sensitivity"] = {"report": "sensitivity.md", "excluded": settings.exclude}
    if qat_info is not None:
        meta["qat"] = qat_info
    if pt2e_info is not None:
        report["pt2e"] = pt2e_info
    md = _markdown(report, meta)
    artefact.write_artefact(
        out,
        fp32=fp32,
        int8=int8,
        img_size=img_size,
        report=report,
        report_md=md,
        meta=meta,
        classes=val.classes,
        torchscript=ts,
    )
    log.info(f"artefact: {out} ({report['verdict']})")
    return report


def _load_data(
    cfg: ExportConfig, img_size: int, kind: str
) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """Calibration, evaluation and (for an embedding) k-NN bank images."""
    d = cfg.data
    calib = load_images(
        d.calibration or d.train,
        img_size,
        cfg.quant.calibration_images,
        None if d.calibration else d.train_index,
    )
    val = load_images(d.val, img_size, d.val_limit or None, d.val_index)
    train: ImageSet | None = None
    if kind == "embedding":
        train = load_images(d.train, img_size, d.bank_limit or None, d.train_index)
    log.info(f"data: {len(calib)} calibration, {len(val)} eval, {len(train or [])} bank images")
    return calib, val, train


def _sensitivity(
    cfg: ExportConfig,
    fp32: Path,
    calib: ImageSet,
    val: ImageSet,
    kind: str,
    settings: QuantSettings,
    out: Path,
) -> dict[str, Any] | None:
    """The per-layer sensitivity scan, when asked; its worst layers join ``settings.exclude``."""
    if not (cfg.sensitivity.enabled or cfg.sensitivity.exclude_top):
        return None
    sens = sensitivity.scan(
        fp32,
        calib.images,
        val.images[: cfg.sensitivity.images],
        kind,
        settings,
        max_nodes=cfg.sensitivity.max_nodes,
    )
    sensitivity.write_report(sens, out)
    worst = sensitivity.top_nodes(sens, cfg.sensitivity.exclude_top)
    settings.exclude = sorted(set(settings.exclude) | set(worst))
    log.info(f"sensitivity: {sens['num_nodes']} nodes scanned; kept in float: {worst}")
    return sens


def _meta(
    cfg: ExportConfig,
    out: Path,
    source: str | None,
    model: nn.Module,
    img_size: int,
    exported: Any,
    settings: QuantSettings,
    report: dict[str, Any],
    int8: Path,
    t0: float,
) -> dict[str, Any]:
    """What the artefact's report and model card say about how it was made."""
    return {
        "name": out.name,
        "source": source or "python object",
        "architecture": type(getattr(model, "backbone", model)).__name__,
        "img_size": img_size,
        "exporter": exported.exporter,
        "exporter_note": exported.note,
        "opset": cfg.opset,
        "fp32_onnx_max_abs_diff": exported.max_abs_diff,
        "fp32_rtol": cfg.fp32_rtol,
        "quantization": {
            **settings.__dict__,
            "scheme": report["scheme"],
            "kept_in_float": float_nodes(int8),
        },
        "calibration_data": cfg.data.calibration or cfg.data.train,
        "eval_data": cfg.data.val,
        "config": cfg.to_dict(),
        "seconds": round(time.time() - t0, 1),
    }


def _recover_with_qat(cfg, model, img_size, kind, calib, val, train, settings, out, before):
    from vitssl.train.edge.qat import qat_finetune

    pool = train if train is not None else calib
    labels = pool.labels if kind == "logits" else None
    drop, steps = before["drop"], cfg.qat.steps
    log.info(f"PTQ drop {drop:.2f} > {cfg.verify.max_drop}: QAT for {steps} steps")
    tuned, losses = qat_finetune(
        model,
        pool.images,
        labels=labels,
        kind=kind,
        steps=cfg.qat.steps,
        lr=cfg.qat.lr,
        batch_size=cfg.qat.batch_size,
    )
    fp32 = out / "model.fp32.onnx"
    # The artefact's FP32 model stays the original; the INT8 model comes from the QAT weights.
    qat_fp32 = export_onnx(
        tuned,
        out / "qat" / "model.qat.fp32.onnx",
        img_size,
        exporter="torchscript",
        opset=cfg.opset,
    ).path
    scheme = before["scheme"]
    int8 = quantize_int8(
        qat_fp32, out / "qat" / f"model.int8.{scheme}.onnx", calib.images, settings, kind=kind
    )
    report = verify(fp32, {scheme: int8}, kind, img_size, val, train, cfg.verify)
    shutil.copyfile(int8, out / "model.int8.onnx")
    info = {
        "steps": cfg.qat.steps,
        "lr": cfg.qat.lr,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "ptq_drop": before["drop"],
        "qat_drop": report["drop"],
        "ptq_int8_accuracy": before["models"]["int8"]["accuracy"],
    }
    log.info(f"after QAT: drop {report['drop']:.2f} (PTQ: {before['drop']:.2f})")
    return report, info


def _pt2e(model, calib, val, train, kind, img_size) -> dict[str, Any]:
    from vitssl.train.edge.quantize_pt2e import quantize_pt2e, run_torch
    from vitssl.train.edge.verify import predictions

    def acc(m: nn.Module) -> tuple[float, Any]:
        out = run_torch(m, val.images)
        bank = run_torch(m, train.images) if train is not None else None
        pred = predictions(
            out,
            kind,
            bank=bank,
            bank_labels=train.labels if train else None,
            num_classes=len(val.classes) if val.classes else None,
        )
        return 100.0 * float((pred == val.labels).mean()), pred

    try:
        with torch.no_grad():
            fp, fp_pred = acc(model)
            q = quantize_pt2e(model, calib.images, img_size)
            qa, q_pred = acc(q)
    except Exception as e:  # report, never fail the export for the second backend
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {
        "backend": "torchao pt2e X86InductorQuantizer (PyTorch reference ops)",
        "fp32_accuracy": fp,
        "int8_accuracy": qa,
        "drop": fp - qa,
        "agreement": 100.0 * float((fp_pred == q_pred).mean()),
    }


def _markdown(report: dict[str, Any], meta: dict[str, Any]) -> str:
    q = meta["quantization"]
    lines = [
        f"# Export report: {meta['name']}",
        "",
        f"Source: `{meta['source']}` ({meta['architecture']}, {meta['img_size']} px). "
        f"ONNX exporter: {meta['exporter']}"
        + (f" ({meta['exporter_note']})" if meta["exporter_note"] else "")
        + f"; FP32 ONNX vs PyTorch max |diff| {meta['fp32_onnx_max_abs_diff']:.2e}.",
        f"INT8: ONNX Runtime static, {q['format']}, activations {q['activation_type']} "
        f"(symmetric {q['symmetric_activations']}), per-channel weights {q['per_channel']}, "
        f"reduced range {q.get('reduce_range', False)}, "
        f"calibration {q['calibration']} on {q['calibration_images']} images; "
        f"kept in float: {', '.join(q['kept_in_float']) or 'none'}.",
        "",
        report_markdown(report),
    ]
    if "qat" in meta:
        a = meta["qat"]
        lines += [
            f"QAT ({a['steps']} steps): drop {a['ptq_drop']:.2f} after PTQ -> "
            f"{a['qat_drop']:.2f} after QAT.",
            "",
        ]
    if "pt2e" in report:
        p = report["pt2e"]
        lines += ["## PT2E (torchao) backend, in PyTorch", ""]
        if "error" in p:
            lines += [f"Failed: {p['error']}", ""]
        else:
            lines += [
                f"FP32 {p['fp32_accuracy']:.2f}%, INT8 {p['int8_accuracy']:.2f}% "
                f"(drop {p['drop']:.2f}, agreement {p['agreement']:.2f}%).",
                "",
            ]
    return "\n".join(lines)
