"""The one-command chain (pretrain -> evaluate -> distil -> INT8 artefact) on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from vitssl.train.edge_export import main

pytestmark = pytest.mark.slow


def _stage_lists(data: Path) -> list[str]:
    """Tiny overrides for every stage, as TOML arrays (JSON lists of strings are valid TOML)."""
    train, val = data / "train" / "train-000000.tar", data / "val" / "val-000000.tar"
    small = ["train.steps=3", "train.micro_batch=8", "data.num_workers=0", "log.every=1"]
    fast = ["train.precision=fp32", "train.zero=zero0", "log.progress=false", *small]
    stages = {
        "pretrain": [
            "model.patch_size=8",
            "method.decoder_dim=32",
            "method.decoder_depth=1",
            "method.decoder_heads=2",
            "log.image_every=0",
            f"data.train_shards={train}",
            *fast,
        ],
        "evaluate": [
            "encoder.compare_random=false",
            "data.num_workers=0",
            f"data.train={train}",
            f"data.val={val}",
        ],
        "distil": [
            "method.teacher={encoder}",
            "train.output_dir={out}",
            "model.name=mobilenetv3_small_050",
            "method.proj_hidden_dim=32",
            "method.queue_size=16",
            f"data.train_shards={train}",
            f"data.val_shards={val}",
            *fast,
        ],
        "export": [
            f"data.train={train}",
            f"data.val={val}",
            "exporter=torchscript",
            "torchscript=false",
            "quant.calibration_images=16",
            "verify.repeats=2",
            "verify.warmup=0",
            "verify.batch_sizes=[1, 4]",
            "qat.enabled=false",
        ],
    }
    return [f"{name}.overrides={json.dumps(items)}" for name, items in stages.items()]


def test_pipeline_one_command_chain(tmp_path: Path) -> None:
    from vitssl.data_pipelines.synthetic import write_default_dataset

    data = tmp_path / "data"
    write_default_dataset(data, train_per_class=6, val_per_class=3, shard_size=100)
    root = tmp_path / "chain"
    args = ["pipeline", "export_pipeline_demo", f"output_dir={root}", *_stage_lists(data)]
    code = main([*args, "export_teacher=true", "--accept-drop"])  # the recipe: student only
    assert code == 0

    # every stage ran into its own folder, the student was distilled from the pretrained encoder
    distil_cfg = json.loads((root / "distil" / "config.json").read_text())
    assert Path(distil_cfg["method"]["teacher"]) == root / "pretrain"
    assert distil_cfg["model"]["name"] == "mobilenetv3_small_050"
    knn = json.loads((root / "evaluate" / "knn.json").read_text())
    assert knn  # the evaluation stage wrote its result
    for name in ("teacher", "student"):
        art = root / f"artefact_{name}"
        for f in ("model.fp32.onnx", "model.int8.onnx", "preprocess.json", "report.json"):
            assert (art / f).is_file(), (name, f)
    # the student artefact embeds what the student computes (the head dropped)
    from vitssl.train.evaluation.encoders import load_encoder

    student = load_encoder(str(root / "distil")).model.eval()
    x = torch.randn(2, 3, 32, 32)
    sess = ort.InferenceSession(str(root / "artefact_student" / "model.fp32.onnx"))
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), student(x), atol=1e-4, rtol=1e-4)
    report = (root / "report.md").read_text()
    assert "pretrain" in report and "distil" in report
    assert (root / "losses.png").stat().st_size > 0


def test_pipeline_refuses_unknown_recipe_before_running(tmp_path: Path, capsys) -> None:
    root = tmp_path / "chain"
    code = main(["pipeline", "export_pipeline_demo", f"output_dir={root}", "distil.recipe=nope"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distil" in err[0] and "nope" in err[0]
    assert not root.exists()  # nothing ran


def test_failing_stage_writes_the_report_and_exits_4(tmp_path: Path, capsys) -> None:
    """A stage that fails (here evaluation of an encoder that does not exist) ends the chain
    with exit code 4 and a report that names the stage, its own exit code and its error."""
    from vitssl.train.cli import EXIT_STAGE

    root, missing = tmp_path / "chain", tmp_path / "no_such_run"
    args = ["pipeline", "export_pipeline_demo", f"output_dir={root}", f"checkpoint={missing}"]
    assert main([*args, "distil.enabled=false"]) == EXIT_STAGE
    report = (root / "report.md").read_text()
    assert "**Stage `evaluate` failed** (exit code 2): error:" in report
    assert str(missing) in report.split("**Stage `evaluate` failed**")[1].splitlines()[0]
    assert "| evaluate | 2 |" in report
    assert not (root / "artefact_teacher").exists()  # nothing ran after the failed stage


def test_failing_export_writes_the_report_and_exits_4(tmp_path: Path) -> None:
    """The export runs in this process: its exception is recorded (traceback in a log file),
    and the report says which export failed and why."""
    from vitssl.train.cli import EXIT_STAGE

    root, missing = tmp_path / "chain", tmp_path / "no_such_run"
    args = ["pipeline", "export_pipeline_demo", f"output_dir={root}", f"checkpoint={missing}"]
    assert main([*args, "evaluate.enabled=false", "distil.enabled=false"]) == EXIT_STAGE
    report = (root / "report.md").read_text()
    line = report.split("**Stage `export teacher` failed** (exit code 2): ")[1].splitlines()[0]
    assert str(missing) in line
    assert "Traceback" in (root / "export_teacher.log").read_text()
