"""metrics.jsonl after a crash and resume, and the device-side step metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vitssl.train.metrics import RunLogger, StepMetrics, truncate_jsonl


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resumed_logger_cuts_rows_replayed_after_the_checkpoint(tmp_path: Path) -> None:
    """A run killed at step 5 with its last checkpoint at 3 resumes at 3 and logs 4..6 again:
    each step must appear once, as after an uninterrupted run."""
    first = RunLogger(tmp_path, rank=0, total_steps=6, start_step=0, progress=False)
    for step in range(1, 6):
        first.scalars(step, {"loss": float(step)})
    first.event(3, stopped="stop_at", checkpoint=3)
    first.jsonl.write('{"step": 6, "loss": 0.')  # the kill cut this row in half
    first.jsonl.flush()  # no close(): kill -9

    resumed = RunLogger(tmp_path, rank=0, total_steps=6, start_step=3, progress=False)
    for step in range(4, 7):
        resumed.scalars(step, {"loss": 10.0 * step})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0}
    assert [r["event"] for r in rows if "event" in r] == [{"stopped": "stop_at", "checkpoint": 3}]


def test_truncate_keeps_rows_up_to_the_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in [1, 2, 2, 3, 4]))
    truncate_jsonl(path, 2)
    assert _steps(path) == [1, 2, 2]
    truncate_jsonl(tmp_path / "absent.jsonl", 2)  # a fresh run: nothing to cut
    assert not (tmp_path / "absent.jsonl").exists()


def test_rewind_forgets_rows_after_the_step(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, rank=0, total_steps=9, start_step=0, progress=True)
    for step in range(1, 8):
        logger.scalars(step, {"loss": 1.0})
    logger.rewind(4)
    logger.scalars(5, {"loss": 2.0})
    logger.close()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]


def test_step_metrics_sum_micro_steps_and_flag_the_first_bad_step() -> None:
    m = StepMetrics(torch.device("cpu"), check_grad_norm=True)
    micro = [{"loss": torch.tensor(0.5), "mse": torch.tensor(0.25)}, {"loss": torch.tensor(1.5)}]
    m.start_step()
    for out in micro:
        m.add(dict(out, embeddings=(torch.zeros(2, 3),)), accum=2)
    m.end_step(1, torch.tensor(3.0))
    assert m.mean_over_ranks({"skipped": 2.0}) == {"loss": 1.0, "mse": 0.125, "skipped": 2.0}
    assert m.first_bad_step() == 0
    m.start_step()
    m.add({"loss": torch.tensor(1.0)}, accum=1)
    m.end_step(2, torch.tensor(math.inf))  # finite loss, infinite gradient norm
    m.start_step()
    m.add({"loss": torch.tensor(math.nan)}, accum=1)
    m.end_step(3, None)
    assert m.first_bad_step() == 2  # the first, not the latest
    m.reset()
    assert m.first_bad_step() == 0


@pytest.mark.parametrize("grad_norm", [math.nan, torch.tensor(math.nan)])
def test_fp16_leaves_gradient_overflow_to_the_loss_scaler(grad_norm: object) -> None:
    m = StepMetrics(torch.device("cpu"), check_grad_norm=False)
    m.start_step()
    m.add({"loss": torch.tensor(1.0)}, accum=1)
    m.end_step(1, grad_norm)
    assert m.first_bad_step() == 0
