"""The distillation report: FLOPs against a hand count, and a tiny end-to-end report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from vitssl.train.distil_report import cpu_latency_ms, forward_flops, report


@pytest.fixture(autouse=True)
def one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_flops_are_two_per_multiply_add() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    macs = 8 * 8 * 4 * 3 * 3 * 3 + 4 * 8 * 8 * 5
    assert forward_flops(model, 8) == 2 * macs
    assert cpu_latency_ms(model, 8, batch=2, runs=3, threads=1) > 0


def _export(out: Path, model: nn.Module, spec: dict) -> Path:
    out.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "encoder.safetensors")
    )
    (out / "encoder.json").write_text(json.dumps(spec))
    return out


def test_report_rows_and_files(tmp_path: Path) -> None:
    from vitssl.data_pipelines.synthetic import write_default_dataset

    write_default_dataset(tmp_path / "data", train_per_class=3, val_per_class=2, img_size=32)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)
    cnn = timm.create_model("mobilenetv3_small_100", num_classes=0)
    teacher = _export(
        tmp_path / "t",
        vit,
        {
            "timm_name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 0},
        },
    )
    student = _export(
        tmp_path / "s", cnn, {"timm_name": "mobilenetv3_small_100", "kwargs": {"num_classes": 0}}
    )
    out = tmp_path / "report"
    rows = report(
        [("teacher", str(teacher)), ("student", str(student))],
        str(tmp_path / "data" / "train" / "train-000000.tar"),
        str(tmp_path / "data" / "val" / "val-000000.tar"),
        out,
        k=5,
        runs=2,
        batches=(1, 2),
    )
    assert [r["encoder"] for r in rows] == ["teacher", "student"]
    assert rows[0]["knn_top1_vs_first_%"] == pytest.approx(100.0)
    assert rows[1]["params_M"] == pytest.approx(sum(p.numel() for p in cnn.parameters()) / 1e6)
    assert rows[0]["GFLOPs"] > rows[1]["GFLOPs"] > 0  # ViT-tiny on 17 tokens vs MNv3-S at 32 px
    assert all(0 <= r["knn_top1"] <= 100 and r["cpu_ms_b1"] > 0 for r in rows)
    saved = json.loads((out / "distil_report.json").read_text())
    assert saved["rows"] == rows and "1 thread(s)" in saved["settings"]["latency"]
    assert "| teacher | vit_tiny_patch16_224 |" in (out / "distil_report.md").read_text()
