"""Two-process pretraining from shards on a real HTTP server and a real S3 server (moto), stopped
at step 3 and resumed: every step's loss equals, bit for bit, an uninterrupted run on the same
shards read from the local disk (the remote shards' index is fetched from the server)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.integration.runs import TINY, read_metrics, shard_overrides, spawn
from tests.shard_servers import http_server, s3_server
from vitssl.train.preemption import EXIT_REQUEUE

pytestmark = pytest.mark.slow

COMMON = [
    "mae_vit_tiny_demo",
    *TINY,
    "train.zero=zero2",
    "train.precision=fp32",
    "train.steps=5",
    "checkpoint.every=100",
    "data.num_workers=1",
]


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def local_losses(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("local")
    run = spawn(2, [*COMMON, *shard_overrides(tiny_shards), f"train.output_dir={out}"])
    assert run.returncode == 0, _tail(run)
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def _interrupted_run(spec: str, out: Path) -> dict[int, float]:
    args = [*COMMON, f"data.train_shards={spec}", f"train.output_dir={out}"]
    first = spawn(2, [*args, "train.stop_at=3"])
    assert first.returncode == EXIT_REQUEUE, _tail(first)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    second = spawn(2, args)
    assert second.returncode == 0, _tail(second)
    return {r["step"]: r["loss"] for r in read_metrics(out)}


SERVERS: dict[str, Callable[[Path], AbstractContextManager]] = {
    "http": lambda root: http_server(root),
    "s3": lambda root: s3_server(root, bucket="data"),
}


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_remote_run_stopped_and_resumed_equals_local_run(
    kind: str, tiny_shards: Path, tmp_path: Path, local_losses: dict[int, float]
) -> None:
    names = sorted(p.name for p in (tiny_shards / "train").glob("*.tar"))
    assert names == [f"train-{i:06d}.tar" for i in range(len(names))]
    with SERVERS[kind](tiny_shards) as server:
        base = server if kind == "http" else "s3://data"
        spec = f"{base}/train/train-{{000000..{len(names) - 1:06d}}}.tar"
        resumed = _interrupted_run(spec, tmp_path / "run")
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert resumed == local_losses  # exact: same samples, same order, same augmentation
