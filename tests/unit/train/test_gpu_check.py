"""``make gpu-check`` in its CPU dry run: every section runs and lands in the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitssl.train import gpu_check


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    failed = gpu_check.write_report(out, dry_run=True, budget_s=900, only=list(gpu_check.SECTIONS))
    text = out.read_text()
    for title in gpu_check.TITLES.values():
        assert f"## {title}" in text
    assert failed == 0, text
    assert "| False | False |" in text and "| True | True |" in text  # compile x ckpt grid
    assert "vit_tiny_patch16_224 | trains" in text  # ZeRO-3 offload section ran a step
    assert "| zero0 |" in text and "| zero2 |" in text
    assert "data wait" in text


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "report.md"
    monkeypatch.setitem(gpu_check.BOXES, "peak", 0.01)  # cannot even start in time
    monkeypatch.setitem(gpu_check.BOXES, "tests", 1000)
    failed = gpu_check.write_report(out, dry_run=True, budget_s=5000, only=["peak", "tests"])
    text = out.read_text()
    assert failed == 1
    assert "timed out" in text.split("## ")[1]  # the peak section
    assert "exit" in text.split("## ")[2]  # the tests section still ran


def test_without_a_gpu_the_real_run_is_a_config_error(capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--out", "/dev/null"]) == 2
    assert capsys.readouterr().err.startswith("config error: no CUDA GPU")
    assert gpu_check.main(["--dry-run", "--sections", "nope"]) == 2
