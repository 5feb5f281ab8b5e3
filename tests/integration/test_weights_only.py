"""Files users hand us load weights-only: a pickle payload in a real run directory is refused
with one line and exit code 2 on every path that reads it, and no code of it runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.runs import ROOT, TINY, shard_overrides
from vitssl.train import checkpoint
from vitssl.train.checkpoint import load_weights_only
from vitssl.train.weights import consolidated_state_dict

pytestmark = pytest.mark.slow

STEP = "step_00000002"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker exists iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _poisoned(tiny_run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the run whose model states are a payload; (run, states file, marker)."""
    run = tmp_path / "poisoned"
    shutil.copytree(tiny_run, run)
    states = run / "checkpoints" / STEP / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code_ran"
    torch.save({"module": Payload(marker)}, states)
    return run, states, marker


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _refused(proc: subprocess.CompletedProcess, states: Path, marker: Path) -> None:
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "config error:"))]
    assert errors == [
        f"error: {states} is not a weights-only checkpoint (refusing to unpickle io.open)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the payload ran"


def test_payload_is_refused_by_export(tiny_run: Path, tmp_path: Path) -> None:
    run, states, marker = _poisoned(tiny_run, tmp_path)
    _refused(
        _cli("vitssl.train.export_encoder", str(run), "--out", str(tmp_path / "out")),
        states,
        marker,
    )


def test_payload_is_refused_by_knn_evaluation(
    tiny_run: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    run, states, marker = _poisoned(tiny_run, tmp_path)
    proc = _cli(
        "vitssl.train.evaluate",
        "knn",
        "eval_default",
        f"encoder.checkpoint={run}",
        f"output_dir={tmp_path / 'eval'}",
        f"data.train={tiny_shards}/train/train-{{000000..000003}}.tar",
        f"data.val={tiny_shards}/val/val-000000.tar",
        "data.num_workers=0",
    )
    _refused(proc, states, marker)


def test_payload_is_refused_as_a_distillation_teacher(
    tiny_run: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    run, states, marker = _poisoned(tiny_run, tmp_path)
    proc = _cli(
        "vitssl.train.distil",
        "distil_vit_tiny_to_mnv3_cifar",
        *shard_overrides(tiny_shards),
        "model.name=mobilenetv3_small_100",
        f"method.teacher={run}",
        "data.num_workers=0",
        "train.micro_batch=8",
        "train.steps=1",
        f"train.output_dir={tmp_path / 'distil'}",
    )
    _refused(proc, states, marker)


def test_payload_is_refused_on_resume(tiny_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    run, states, marker = _poisoned(tiny_run, tmp_path)
    proc = _cli(
        "vitssl.train.pretrain",
        "mae_vit_tiny_demo",
        *TINY,
        *shard_overrides(tiny_shards),
        "train.steps=3",
        f"checkpoint.resume={run / 'checkpoints' / STEP}",
        f"train.output_dir={tmp_path / 'resumed'}",
    )
    _refused(proc, states, marker)


def test_deepspeed_files_load_weights_only_and_consolidate_as_zero_to_fp32(
    tiny_run: Path,
) -> None:
    """The allow-list covers what DeepSpeed pickles (ZeRO-2 bf16 optimizer states), and the
    weights-only consolidation equals DeepSpeed's own (unpickling) zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = tiny_run / "checkpoints" / STEP
    optim = next(ckpt.glob("*optim_states.pt"))
    state = load_weights_only(optim)
    assert "optimizer_state_dict" in state
    ours = consolidated_state_dict(ckpt)
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=STEP)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v.float()), k


def _swap_after_check(monkeypatch: pytest.MonkeyPatch, module: object, target: Path) -> Path:
    """Patch ``module.verify_weights_only`` to pass, then replace ``target`` by a payload:
    a file swapped between the check and DeepSpeed's own read. Returns the marker."""
    marker = target.parent.parent / "code_ran"
    real = checkpoint.verify_weights_only

    def check_then_swap(path: Path) -> None:
        real(path)
        torch.save({"optimizer_state_dict": Payload(marker)}, target)

    monkeypatch.setattr(module, "verify_weights_only", check_then_swap)
    return marker


def test_a_file_swapped_after_the_check_is_refused_by_zero_to_fp32(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zero_to_fp32 passes weights_only=False to torch.load; it runs under the weights-only
    loader, so a file changed after verify_weights_only is refused, not unpickled (and not
    mistaken for "no ZeRO partitions to merge")."""
    import vitssl.train.weights as weights

    ckpt = Path(shutil.copytree(tiny_run / "checkpoints" / STEP, tmp_path / STEP))
    optim = next(ckpt.glob("*optim_states.pt"))
    marker = _swap_after_check(monkeypatch, weights, optim)
    with pytest.raises(checkpoint.CheckpointFileError) as refused:
        consolidated_state_dict(ckpt)
    assert str(refused.value) == (
        f"{optim} is not a weights-only checkpoint (refusing to unpickle io.open)"
    )
    assert not marker.exists(), "the payload ran"
    assert torch.load is checkpoint._TORCH_LOAD, "torch.load was not restored"


def test_a_file_swapped_after_the_check_is_refused_by_the_universal_conversion(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ds_to_universal (a subprocess, elastic resume) reads under the weights-only loader."""
    ckpt = Path(shutil.copytree(tiny_run / "checkpoints" / STEP, tmp_path / STEP))
    optim = next(ckpt.glob("*optim_states.pt"))
    marker = _swap_after_check(monkeypatch, checkpoint, optim)
    with pytest.raises(ValueError) as refused:
        checkpoint.ensure_universal(ckpt, rank=0)
    assert str(refused.value) == (
        f"could not convert {ckpt} to a universal checkpoint: "
        f"{optim} is not a weights-only checkpoint (refusing to unpickle io.open)"
    )
    assert not marker.exists(), "the payload ran"
    assert not (ckpt / checkpoint.UNIVERSAL / checkpoint.MARKER).exists()


def test_the_universal_conversion_still_converts_under_the_weights_only_loader(
    tiny_run: Path, tmp_path: Path
) -> None:
    """The same conversion of the untouched checkpoint succeeds: every file DeepSpeed reads
    and writes along the way is weights-only, so the forced loader refuses nothing real."""
    ckpt = Path(shutil.copytree(tiny_run / "checkpoints" / STEP, tmp_path / STEP))
    checkpoint.ensure_universal(ckpt, rank=0)
    assert (ckpt / checkpoint.UNIVERSAL / checkpoint.MARKER).is_file()
    params = ckpt / checkpoint.UNIVERSAL / "zero"
    fp32 = {p.parent.name: p for p in params.glob("*/fp32.pt")}
    theirs = consolidated_state_dict(ckpt)
    assert set(fp32) <= set(theirs) and len(fp32) > 10
    for name, path in fp32.items():
        saved = load_weights_only(path)["param"]
        assert torch.equal(saved.float().reshape(theirs[name].shape), theirs[name]), name
