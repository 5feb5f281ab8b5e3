"""End to end on the CPU: pretrain a tiny MAE, evaluate it (k-NN, pictures), fine-tune it
on two DeepSpeed processes through the one trainer, and refuse bad inputs with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.integration.runs import TINY, read_metrics, shard_overrides, spawn

pytestmark = pytest.mark.slow

FINETUNE_TINY = [
    "model.patch_size=8",
    "train.micro_batch=8",
    "train.precision=fp32",
    "data.num_workers=0",
    "log.every=1",
    "log.progress=false",
    "optim.warmup_steps=1",
]


def evaluate(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m vitssl.train.evaluate ARGS`` as N ranks (one process each, like srun)."""
    return spawn(nproc, args, timeout, module="vitssl.train.evaluate")


@pytest.fixture(scope="module")
def pretrained(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("mae") / "run"
    proc = spawn(
        1,
        [
            "mae_vit_tiny_demo",
            *TINY,
            *shard_overrides(tiny_shards),
            "train.precision=fp32",
            "train.steps=2",
            f"train.output_dir={run}",
        ],
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return run


def _data(root: Path) -> list[str]:
    return [
        f"data.train={root}/train/train-{{000000..000003}}.tar",
        f"data.val={root}/val/val-000000.tar",
        "data.num_workers=0",
    ]


def test_finetune_two_processes(pretrained: Path, tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "ft"
    proc = evaluate(
        2,
        [
            "finetune",
            "finetune_vit_tiny_default",
            *FINETUNE_TINY,
            *shard_overrides(tiny_shards),
            f"data.val_shards={tiny_shards}/val/val-000000.tar",
            f"method.init={pretrained}",
            "train.steps=3",
            f"train.output_dir={run}",
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    result = json.loads((run / "finetune.json").read_text())
    (row,) = result["results"]
    assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
    assert result["data"]["val_samples"] == 50 and result["checkpoint"]["init"] == str(pretrained)
    assert (run / "finetune.md").is_file()


def test_knn_and_pictures_of_a_run(pretrained: Path, tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    common = [f"encoder.checkpoint={pretrained}", f"output_dir={out}", *_data(tiny_shards)]
    proc = evaluate(1, ["knn", "eval_default", *common, "knn.k=5"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((out / "knn.json").read_text())
    assert [r["encoder"] for r in result["results"]] == ["pretrained", "random"]
    assert result["checkpoint"]["pretrained"]["step"] == 2
    assert result["data"]["train_samples"] == 200 and result["data"]["val_samples"] == 50
    assert all(0 <= r["distance/top1"] <= r["distance/top5"] <= 100 for r in result["results"])
    proc = evaluate(
        1,
        [
            "pictures",
            "eval_default",
            *common,
            "pictures.tsne_samples=50",
            "pictures.queries=2",
            "pictures.neighbours=3",
            "pictures.mae_images=2",
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    for name in ("tsne.png", "knn_neighbours.png", "mae_reconstructions.png", "pictures.md"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())


def test_bad_inputs_are_refused(pretrained: Path, tiny_shards: Path, tmp_path: Path) -> None:
    proc = evaluate(
        1, ["knn", "eval_default", f"encoder.checkpoint={tmp_path / 'nope'}", *_data(tiny_shards)]
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = evaluate(
        1,
        [
            "finetune",
            "finetune_vit_tiny_default",
            *FINETUNE_TINY,
            *shard_overrides(tiny_shards),
            "method.num_classes=5",
            f"data.val_shards={tiny_shards}/val/val-000000.tar",
        ],
    )
    assert proc.returncode == 2 and "label 9 >= method.num_classes=5" in proc.stderr
    proc = evaluate(
        1,
        [
            "finetune",
            "finetune_vit_tiny_default",
            *FINETUNE_TINY,
            *shard_overrides(tiny_shards),
            "model.patch_size=4",
            f"method.init={pretrained}",
            f"train.output_dir={tmp_path / 'x'}",
            f"data.val_shards={tiny_shards}/val/val-000000.tar",
        ],
    )
    assert proc.returncode == 2 and "does not match the architecture" in proc.stderr
