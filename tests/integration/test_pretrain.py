"""Real multi-process DeepSpeed runs on the CPU (gloo): ZeRO-2/3 in bf16, exact resume, signals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.integration.runs import ROOT, TINY, launch, read_metrics, shard_overrides, spawn
from vitssl.train.checkpoint import complete_checkpoints
from vitssl.train.evaluation.encoders import load_encoder
from vitssl.train.preemption import EXIT_REQUEUE

pytestmark = pytest.mark.slow


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_process_bf16_run_checkpoints_and_exports(
    zero: str, tiny_shards: Path, tmp_path: Path
) -> None:
    """ZeRO-2 runs as 2 simulated nodes x 1 process (torchrun --nnodes 2 over loopback),
    ZeRO-3 as 1 node x 2 processes."""
    run = tmp_path / "run"
    nodes, per_node = (2, 1) if zero == "zero2" else (1, 2)
    proc = launch(
        per_node,
        [
            "mae_vit_tiny_demo",
            *TINY,
            *shard_overrides(tiny_shards),
            f"train.zero={zero}",
            "train.precision=bf16",
            "train.steps=4",
            "log.image_every=2",
            # patch 4: the position table (65 x 192) is above ZeRO-3's persistence threshold,
            # so it is partitioned and must be gathered although ViT.forward is never called
            "model.patch_size=4",
            f"data.val_shards={tiny_shards / 'val'}",
            "log.knn_every=2",
            "checkpoint.every=2",
            "checkpoint.keep=1",
            f"train.output_dir={run}",
        ],
        nnodes=nodes,
    )
    assert proc.returncode == 0, _tail(proc)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[-1]["samples_seen"] == 4 * 2 * 8
    # online k-NN on the labelled validation shards, every 2 steps, on every rank
    knn = [json.loads(x) for x in (run / "metrics.jsonl").open() if "knn/top1" in x]
    assert [r["step"] for r in knn] == [2, 4]
    assert all(0.0 <= r["knn/top1"] <= 100.0 for r in knn)
    # keep=1: only the final checkpoint survives, and it is complete
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_00000004"]
    # the exported encoder is consolidated from the ZeRO partitions and loads into timm
    weights = run / "export" / "encoder.safetensors"
    model = load_encoder(str(weights)).model
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=0)
    assert set(model.state_dict()) == set(reference.state_dict())
    state = load_file(str(weights))
    assert all(t.dtype == torch.float32 for t in state.values())
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 192) and torch.isfinite(feats).all()


def test_resume_is_exact(tiny_shards: Path, tmp_path: Path) -> None:
    """Stopped at step 3 and resumed == uninterrupted, step by step (fp32 on the CPU).

    Launched like srun (one process per rank) since torchrun reports any non-zero exit as 1.
    """
    common = [
        "mae_vit_tiny_demo",
        *TINY,
        *shard_overrides(tiny_shards),
        "train.zero=zero2",
        "train.precision=fp32",
        "train.steps=6",
        "checkpoint.every=100",
        "data.num_workers=1",
    ]
    full = spawn(2, [*common, f"train.output_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, _tail(full)
    part = tmp_path / "part"
    first = spawn(2, [*common, f"train.output_dir={part}", "train.stop_at=3"])
    assert first.returncode == EXIT_REQUEUE, _tail(first)
    assert [p.name for p in complete_checkpoints(part / "checkpoints")] == ["step_00000003"]
    second = spawn(2, [*common, f"train.output_dir={part}"])
    assert second.returncode == 0, _tail(second)
    a = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    b = {r["step"]: r for r in read_metrics(part)}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-12)
    ea = load_file(str(tmp_path / "full" / "export" / "encoder.safetensors"))
    eb = load_file(str(part / "export" / "encoder.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6)


def test_sigterm_saves_checkpoint_and_exits_75(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "vitssl.train.pretrain",
        "mae_vit_tiny_demo",
        *TINY,
        *shard_overrides(tiny_shards),
        "train.zero=zero0",
        "train.precision=fp32",
        "train.steps=10000",
        "checkpoint.every=10000",
        f"train.output_dir={run}",
    ]
    env = dict(os.environ, MASTER_PORT=str(29600 + os.getpid() % 1000))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2:
            break
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    logged = [r["step"] for r in read_metrics(run)]
    ckpts = complete_checkpoints(run / "checkpoints")
    assert len(ckpts) == 1
    assert int(ckpts[0].name.split("_")[1]) == logged[-1]
    assert logged == list(range(1, logged[-1] + 1))


def test_elastic_resume_two_ranks_to_one(tiny_shards: Path, tmp_path: Path) -> None:
    """A ZeRO-2 checkpoint of 2 ranks resumes on 1 rank through a universal checkpoint."""
    run = tmp_path / "run"
    common = [
        "mae_vit_tiny_demo",
        *TINY,
        *shard_overrides(tiny_shards),
        "train.zero=zero2",
        "train.precision=fp32",
        "train.steps=5",
        "checkpoint.every=100",
        f"train.output_dir={run}",
    ]
    first = spawn(2, [*common, "train.stop_at=3"])
    assert first.returncode == EXIT_REQUEUE, _tail(first)
    ckpt = run / "checkpoints" / "step_00000003"
    probe = subprocess.run(
        [sys.executable, "-m", "tests.integration.elastic_probe", str(ckpt)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [ln for ln in probe.stdout.splitlines() if ln.startswith("ELASTIC")]
    assert line, probe.stdout[-2000:] + probe.stderr[-2000:]
    fields = dict(kv.split("=") for kv in line[0].split()[1:])
    assert float(fields["max_abs_diff"]) == 0.0  # equal to DeepSpeed's zero_to_fp32 merge
    assert float(fields["moved_from_init"]) > 1e-3  # and those are trained weights
    assert int(fields["adam_step"]) == 3  # optimizer state came along
    second = spawn(1, common)
    assert second.returncode == 0, _tail(second)
    rows = {r["step"]: r for r in read_metrics(run)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[3]["samples_seen"] == 3 * 16  # 2 ranks x 8
    assert rows[5]["samples_seen"] == 3 * 16 + 2 * 8  # then 1 rank x 8
    assert (ckpt / "universal" / "COMPLETE").is_file()


def test_missing_shard_is_one_line_error_before_training(tmp_path: Path) -> None:
    run = tmp_path / "run"
    missing = tmp_path / "nowhere" / "train-000000.tar"
    cmd = [
        sys.executable,
        "-m",
        "vitssl.train.pretrain",
        "mae_vit_tiny_demo",
        *TINY,
        f"data.train_shards={missing}",
        f"train.output_dir={run}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: shard not found: {missing}"]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
