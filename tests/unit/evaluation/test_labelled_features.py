"""Labelled reader (every sample, in order, per-rank ranges) and 1-rank vs 2-rank features."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from tests.unit.evaluation.conftest import train_spec, val_spec
from vitssl.data_pipelines.decode import decode_pixels
from vitssl.data_pipelines.labelled import LabelledReader, batches_per_rank, rank_range
from vitssl.data_pipelines.transforms import build_transform
from vitssl.train.evaluation.encoders import load_encoder
from vitssl.train.evaluation.features import extract_features


def _all_raw(root: Path) -> list[tuple[bytes, int]]:
    """Independent read: tarfile, members in order, (jpg, cls) pairs."""
    out = []
    for shard in sorted((root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        keys = dict.fromkeys(n.rsplit(".", 1)[0] for n in members)  # first-seen order
        out += [(members[f"{k}.jpg"], int(members[f"{k}.cls"])) for k in keys]
    return out


def test_reader_yields_every_sample_in_order(shapes: Path) -> None:
    raw = _all_raw(shapes)
    transform = build_transform("eval", 32)
    seen = []
    for rank in range(3):
        reader = LabelledReader(train_spec(shapes), 32, rank=rank, world_size=3, batch_size=4)
        for b in reader:
            seen += list(zip(b["index"].tolist(), b["label"].tolist(), b["image"], strict=True))
    assert [i for i, _, _ in seen] == list(range(30))
    assert [lab for _, lab, _ in seen] == [lab for _, lab in raw]
    ref = transform(decode_pixels(raw[17][0], transform.decode_min_size))[0]
    assert torch.equal(seen[17][2], ref)


def test_ranges_and_padding() -> None:
    assert [rank_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert batches_per_rank(10, 3, 2) == 2


def test_padding_gives_equal_batch_counts(shapes: Path) -> None:
    counts = []
    for rank in range(4):
        r = LabelledReader(val_spec(shapes), 32, rank=rank, world_size=4, batch_size=2, pad=True)
        batches = list(r)
        counts.append(len(batches))
        real = torch.cat([b["index"][b["index"] >= 0] for b in batches])
        assert real.tolist() == list(range(*rank_range(20, rank, 4)))
    assert len(set(counts)) == 1


def test_missing_labels_are_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    shard = tmp_path / "u-000000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="data has no labels"):
        list(LabelledReader(str(shard), 16))


def test_image_folder(tmp_path: Path) -> None:
    for c, colour in (("b_cls", (0, 0, 255)), ("a_cls", (255, 0, 0))):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20), colour).save(tmp_path / c / f"{i}.png")
    reader = LabelledReader(str(tmp_path), 16, batch_size=8)
    (batch,) = list(reader)
    assert reader.classes == ["a_cls", "b_cls"]
    assert batch["label"].tolist() == [0, 0, 1, 1]
    assert batch["image"][0, 0].mean() > batch["image"][3, 0].mean()  # red before blue


def _worker(rank: int, world: int, port: int, spec: str, export: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    enc = load_encoder(export)
    reader = LabelledReader(spec, 32, rank=rank, world_size=world, batch_size=4, pad=True)
    f = extract_features(enc.model, reader, torch.device("cpu"), "avg")
    if rank == 1:
        torch.save({"feats": f.feats, "labels": f.labels}, out)
    dist.destroy_process_group()


def test_one_rank_equals_two_ranks(shapes: Path, export: Path, tmp_path: Path) -> None:
    from tests.integration.runs import free_port

    enc = load_encoder(str(export))
    reader = LabelledReader(train_spec(shapes), 32, batch_size=5)
    single = extract_features(enc.model, reader, torch.device("cpu"), "avg")
    assert single.feats.dtype == torch.float16 and single.feats.shape == (30, 192)
    out = tmp_path / "two.pt"
    args = (2, free_port(), train_spec(shapes), str(export), str(out))
    mp.start_processes(_worker, args=args, nprocs=2, start_method="fork")  # fork: no re-imports
    two = torch.load(out)
    assert torch.equal(two["labels"], single.labels)
    torch.testing.assert_close(two["feats"].float(), single.feats.float(), atol=2e-3, rtol=0)
