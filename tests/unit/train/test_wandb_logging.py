"""W&B logging (offline, a real wandb run): the values logged are the ones in the run's file,
images go along, and a resumed run continues the same W&B run id."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from vitssl.train.metrics import RunLogger

wandb = pytest.importorskip("wandb", reason="needs wandb (extra 'wandb')")


def history(run_file: Path) -> list[dict[str, str]]:
    """History rows of an offline ``run-*.wandb`` file. The file is a LevelDB-style log
    (7-byte file header; 32 KiB blocks of chunks with a crc32/length/type header) of
    ``wandb_internal_pb2.Record`` messages; wandb 0.31 ships no Python reader of it."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block = run_file.read_bytes(), 7, 32768
    records, data = [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        data = chunk if kind in (1, 2) else data + chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(data)
    rows = []
    for blob in records:
        record = pb.Record()
        record.ParseFromString(blob)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
    return rows


def test_offline_wandb_run_has_the_logged_values_and_resumes_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"method": {"name": "mae"}}
    log = RunLogger(tmp_path, 0, 10, 0, False, wandb_project="vitssl-test", config=config)
    log.scalars(1, {"loss_metrics/loss": 2.5, "lr": 0.125})
    log.scalars(2, {"loss_metrics/loss": 1.5, "lr": 0.25})
    log.image(2, "mae/reconstruction", torch.rand(3, 8, 8))
    log.close()
    log = RunLogger(tmp_path, 0, 10, 2, False, wandb_project="vitssl-test", config=config)
    log.scalars(3, {"loss_metrics/loss": 0.5, "lr": 0.375})
    log.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # one W&B run, resumed
    deadline = time.monotonic() + 30  # wandb-core may still be writing the last records
    while True:
        rows = [r for f in files for r in history(f)]
        if len(rows) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [int(r["_step"]) for r in rows] == [1, 2, 3]
    assert [float(r["lr"]) for r in rows] == [0.125, 0.25, 0.375]
    assert [float(r["loss_metrics/loss"]) for r in rows] == [2.5, 1.5, 0.5]
    assert json.loads(rows[1]["mae/reconstruction/_type"]) == "image-file"
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in jsonl] == [2.5, 1.5, 0.5]  # the JSONL is written as before


def test_other_ranks_never_start_wandb(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, 1, 10, 0, False, wandb_project="vitssl-test")
    log.scalars(1, {"lr": 1.0})
    log.close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()
