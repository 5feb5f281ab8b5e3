"""Faults end in one line and lose nothing: a full disk, a read-only output directory, and a
checkpoint resumed into another model. Real file systems: a small tmpfs fills up, a tmpfs
mounted read-only refuses writes (root ignores file modes, not mount flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.runs import ROOT, TINY, shard_overrides
from vitssl.train.checkpoint import MARKER, complete_checkpoints

pytestmark = pytest.mark.slow


def _mount(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = done.stderr.strip()
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {reason}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A mount point; the test mounts it with its own options, and it is unmounted after."""
    target = tmp_path / "mnt"
    yield target
    subprocess.run(["umount", str(target)], capture_output=True)


def _pretrain(tiny_shards: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "vitssl.train.pretrain",
        "mae_vit_tiny_demo",
        *TINY,
        *shard_overrides(tiny_shards),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_disk_full_during_a_save_is_one_line_and_leaves_no_partial_step(
    tiny_shards: Path, tmpfs: Path
) -> None:
    """A 73 MB checkpoint does not fit in 24 MB: the save fails half-way."""
    _mount(tmpfs, "size=24m")
    run = tmpfs / "run"
    proc = _pretrain(tiny_shards, "train.steps=1", f"train.output_dir={run}")
    line = _one_error(proc)
    step = run / "checkpoints" / "step_00000001"
    assert line.startswith(f"error: could not save checkpoint {step}: No space left on device")
    assert "free there)" in line
    assert not step.exists(), "the partial step directory was left behind"


def test_too_little_space_for_the_next_checkpoint_is_refused_before_writing(
    tiny_shards: Path, tmpfs: Path
) -> None:
    """Room for one checkpoint, not two: the second save is refused up front, the first stays."""
    _mount(tmpfs, "size=110m")
    run = tmpfs / "run"
    proc = _pretrain(
        tiny_shards,
        "train.steps=2",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        f"train.output_dir={run}",
    )
    line = _one_error(proc)
    root = run / "checkpoints"
    assert line.startswith(f"error: not enough space to save a checkpoint in {root}: ")
    assert "free, the last checkpoint (step_00000001) took" in line
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000001"]
    assert not (root / "step_00000002").exists()


def test_read_only_output_directory_is_one_line(tiny_shards: Path, tmpfs: Path) -> None:
    _mount(tmpfs, "size=1m,ro")
    run = tmpfs / "run"
    line = _one_error(_pretrain(tiny_shards, "train.steps=1", f"train.output_dir={run}"))
    assert line == f"error: output directory {run} is not writable: Read-only file system"


@pytest.mark.parametrize(
    ("override", "differs"),
    [
        ("model.patch_size=4", "backbone.patch_embed.proj.weight 192x3x8x8 there, 192x3x4x4 here"),
        ("method.decoder_dim=64", "decoder_blocks.0.attn.proj.bias 32 there, 64 here"),
    ],
)
def test_resume_into_another_model_is_refused_naming_the_difference(
    tiny_run: Path, tiny_shards: Path, tmp_path: Path, override: str, differs: str
) -> None:
    ckpt = tiny_run / "checkpoints" / "step_00000002"
    assert (ckpt / MARKER).is_file()
    proc = _pretrain(
        tiny_shards,
        "train.steps=3",
        override,
        f"checkpoint.resume={ckpt}",
        f"train.output_dir={tmp_path / 'resumed'}",
    )
    line = _one_error(proc)
    assert line.startswith(f"error: checkpoint {ckpt} (method mae, model vit_tiny_patch16_224")
    assert "does not fit this model" in line and differs in line, line
    assert "size mismatch" not in proc.stderr
