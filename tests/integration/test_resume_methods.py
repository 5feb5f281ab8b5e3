"""Exact resume of the methods with state outside the optimizer: BYOL (EMA target), MoCo v3
with a queue (EMA key encoder and queue), DINO (EMA teacher and centre, 2 ranks) and
distillation (projector and relational queue).

Stopped at step 3 and resumed must equal the uninterrupted run bit for bit: every step's
loss, the final method state (``extra_state.safetensors``: teachers, queues, centre) and
the exported encoder. Modelled on test_pretrain.test_resume_is_exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.runs import read_metrics, shard_overrides, spawn
from tests.integration.test_distil import STUDENT, _teacher
from vitssl.train.preemption import EXIT_REQUEUE

pytestmark = pytest.mark.slow

SMALL = [
    "model.patch_size=8",
    "train.micro_batch=8",
    "train.precision=fp32",
    "train.steps=6",
    "checkpoint.every=100",
    "data.num_workers=0",
    "optim.warmup_steps=2",
    "log.every=1",
    "log.image_every=0",
    "log.monitor_every=0",
    "log.progress=false",
]

CASES = {
    "byol": (
        1,
        [
            "byol_vit_tiny_cifar",
            "method.proj_hidden_dim=32",
            "method.proj_out_dim=16",
            "method.momentum=0.9",
            "train.zero=zero0",
        ],
    ),
    "mocov3_queue": (
        1,
        [
            "mocov3_vit_tiny_cifar",
            "method.proj_hidden_dim=32",
            "method.proj_out_dim=16",
            "method.queue_size=32",
            "method.momentum=0.9",
            "train.zero=zero0",
        ],
    ),
    "dino": (
        2,
        [
            "dino_vit_tiny_cifar",
            "method.out_dim=64",
            "method.hidden_dim=32",
            "method.bottleneck_dim=16",
            "method.momentum=0.9",
            "data.local_crops=2",
            "data.local_crop_size=16",
            "method.freeze_last_layer=0",
            "train.zero=zero2",
        ],
    ),
}


def _resume_equals_full(nproc: int, args: list[str], tmp: Path, module: str) -> None:
    full = spawn(nproc, [*args, f"train.output_dir={tmp / 'full'}"], module=module)
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    part = tmp / "part"
    first = spawn(nproc, [*args, f"train.output_dir={part}", "train.stop_at=3"], module=module)
    assert first.returncode == EXIT_REQUEUE, (first.stdout + first.stderr)[-3000:]
    second = spawn(nproc, [*args, f"train.output_dir={part}"], module=module)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    a = {r["step"]: r for r in read_metrics(tmp / "full")}
    b = {r["step"]: r for r in read_metrics(part)}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step]["loss"] == a[step]["loss"], step  # bit for bit
    last = "checkpoints/step_00000006"
    ea, eb = (load_file(str(d / last / "extra_state.safetensors")) for d in (tmp / "full", part))
    assert sorted(ea) == sorted(eb) and ea
    for k in ea:
        assert ea[k].equal(eb[k]), k
    xa, xb = (load_file(str(d / "export" / "encoder.safetensors")) for d in (tmp / "full", part))
    for k in xa:
        assert xa[k].equal(xb[k]), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_resume_is_bit_identical(case: str, tiny_shards: Path, tmp_path: Path) -> None:
    nproc, args = CASES[case]
    _resume_equals_full(
        nproc,
        [args[0], *SMALL, *shard_overrides(tiny_shards), *args[1:]],
        tmp_path,
        "vitssl.train.pretrain",
    )


def test_distillation_resume_is_bit_identical(tiny_shards: Path, tmp_path: Path) -> None:
    weights = _teacher(tmp_path / "teacher")
    args = [
        "distil_vit_tiny_to_mnv3_cifar",
        *SMALL,
        *shard_overrides(tiny_shards),
        f"model.name={STUDENT}",
        f"method.teacher={weights.parent}",
        "method.teacher_pool=cls",
        "method.proj_hidden_dim=32",
        "method.w_patch=0.0",
        "method.queue_size=64",
        "train.zero=zero0",
    ]
    _resume_equals_full(1, args, tmp_path, "vitssl.train.distil")
