"""The trainer under faults: NaN rollback on 2 processes, and no host sync between logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.runs import ROOT, TINY, free_port, read_metrics, shard_overrides, spawn

pytestmark = pytest.mark.slow


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-4000:]


def _events(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" in r]


def test_nan_rolls_back_skips_the_batch_and_equals_a_run_that_skipped_it(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """Rank 0's loss (and so every gradient) goes NaN at step 5. Checks run on logging and
    checkpoint steps only (2, 3, 4, 6, 8), so the flag is read at step 6: the run goes back
    to the checkpoint of step 3, replays step 4, skips step 5's batch and finishes. Its
    losses from step 4 on must equal, bit for bit, an uninterrupted run told to skip that
    batch. A NaN at the same step every time it runs stops after train.max_rollbacks."""
    common = [
        *TINY,
        *shard_overrides(tiny_shards),
        "train.zero=zero2",
        "train.precision=bf16",
        "train.steps=8",
        "log.every=2",
        "checkpoint.every=3",
    ]
    runs = {
        "reference": ("mae", [], [5]),
        "rollback": ("mae_nan", ["method.nan_step=5"], []),
        "diverged": ("mae_nan", ["method.nan_step=5", "method.nan_once=false"], []),
        # preempted at step 6, where the NaN of step 5 is found: rolled back to step 3 and
        # stopped for a requeue; the requeued run (a clean mae in the same directory) must
        # still skip step 5's batch and count the rollback
        "preempted": ("mae_nan", ["method.nan_step=5", "method.term_step=6"], []),
        "requeued": ("mae", [], []),
    }
    spec = [
        {
            "recipe": "mae_vit_tiny_demo",
            "overrides": [
                *common,
                f"method.name={method}",
                *extra,
                f"train.output_dir={tmp_path / ('preempted' if name == 'requeued' else name)}",
                *(["train.max_rollbacks=1"] if name == "diverged" else []),
            ],
            "skip_at": skip,
        }
        for name, (method, extra, skip) in runs.items()
    ]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = spawn(2, [str(tmp_path / "spec.json")], module="tests.integration.rollback_probe")
    out = _tail(proc)
    assert "RUN 0 EXIT 0" in proc.stdout and "RUN 1 EXIT 0" in proc.stdout, out
    assert "RUN 2 EXIT 5" in proc.stdout, out  # EXIT_DIVERGED
    assert "RUN 3 EXIT 75" in proc.stdout and "RUN 4 EXIT 0" in proc.stdout, out

    ref = {r["step"]: r for r in read_metrics(tmp_path / "reference")}
    rolled = read_metrics(tmp_path / "rollback")
    assert [r["step"] for r in rolled] == [2, 4, 6, 8]  # rows of the thrown-away steps cut
    for row in rolled:
        assert row["loss"] == ref[row["step"]]["loss"], row["step"]
        assert row["samples_seen"] == ref[row["step"]]["samples_seen"]
    assert rolled[-1]["samples_seen"] == 9 * 2 * 8  # 8 steps and one skipped batch
    events = [e["event"] for e in _events(tmp_path / "rollback") if "rollback" in e["event"]]
    assert events == [{"rollback": {"to_step": 3, "skip_step": 5}}]
    ea = load_file(str(tmp_path / "reference" / "export" / "encoder.safetensors"))
    eb = load_file(str(tmp_path / "rollback" / "export" / "encoder.safetensors"))
    assert all(ea[k].equal(eb[k]) for k in ea)

    requeued = read_metrics(tmp_path / "preempted")
    assert [r["step"] for r in requeued] == [2, 4, 6, 8]
    for row in requeued:
        assert row["loss"] == ref[row["step"]]["loss"], row["step"]
        assert row["samples_seen"] == ref[row["step"]]["samples_seen"]
    # the requeued run's resume cut the log back to step 3, the rollback's event with it
    pending = json.loads((tmp_path / "preempted" / "checkpoints" / "rollback.json").read_text())
    assert pending == {"step": 3, "skip_at": [5], "rollbacks": 1}
    meta = json.loads(
        (tmp_path / "preempted" / "checkpoints" / "step_00000008" / "meta.json").read_text()
    )
    assert meta["rollbacks"] == 1

    diverged = [ln for ln in proc.stderr.splitlines() if "training diverged" in ln]
    assert diverged == [
        "error: training diverged: non-finite loss or gradient norm at step 5 after "
        "1 rollback(s) (train.max_rollbacks=1)"
    ]
    assert not (tmp_path / "diverged" / "export").exists()


def test_no_host_sync_between_logging_steps(tiny_shards: Path, tmp_path: Path) -> None:
    """Counts aten._local_scalar_dense (.item(), float(), bool() of a tensor) per step of a
    real run: steps 3 and 6 log (and 6 checkpoints), the others must read nothing back.
    bf16 and a fused AdamW, as on a GPU: in fp32/fp16 DeepSpeed's ZeRO-1/2 optimizer itself
    reads the gradient norm every step (is_invalid_grad_norm), and torch's unfused AdamW
    reads its step counters (host tensors there, on the CPU build here)."""
    cmd = [
        sys.executable,
        "-m",
        "tests.integration.sync_probe",
        "mae_vit_tiny_demo",
        *TINY,
        *shard_overrides(tiny_shards),
        "data.num_workers=1",  # the loader's own reads happen in its worker, as in a real run
        "train.zero=zero2",
        "train.precision=bf16",
        "optim.fused=true",
        "train.steps=6",
        "log.every=3",
        "log.monitor_every=0",
        "checkpoint.every=100",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _tail(proc)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SYNCS ")]
    assert line, _tail(proc)
    counts = {int(k): v for k, v in json.loads(line[0][len("SYNCS ") :]).items()}
    where = "\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("WHERE"))
    assert {s: counts[s] for s in (1, 2, 4, 5)} == {1: 0, 2: 0, 4: 0, 5: 0}, where
    assert counts[3] > 0 and counts[6] > 0  # the counter sees the logging steps' reads
