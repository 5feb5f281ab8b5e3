"""Shards read over HTTP, S3 (moto) and pipes give the batches local shards give, resume included;
the wids index is written, read first, and fetched from where the shards are."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from tests.shard_servers import http_server, s3_server
from vitssl.data_pipelines.loader import build_loader
from vitssl.data_pipelines.make_shards import write_shards
from vitssl.data_pipelines.shard_index import (
    INDEX_NAME,
    WIDS_INDEX_NAME,
    expand_shards,
    read_index,
    wids_index,
)
from vitssl.data_pipelines.tar_samples import iter_members, read_samples


def make_tar(fmt: int) -> bytes:
    """40 members with long names (GNU/pax records), sizes around the 512-byte block."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i in range(40):
            depth = 150 if fmt != tarfile.USTAR_FORMAT and i % 2 else 20
            data = bytes([i]) * [0, 1, 511, 512, 513, 2000][i % 6]
            info = tarfile.TarInfo("d" * depth + f"/sample{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class ShortReads(io.RawIOBase):
    """A forward-only stream that hands out at most 700 bytes per read (as sockets do)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), 700, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def first_pixels(img) -> list[torch.Tensor]:
    return [torch.tensor(list(img.crop((0, 0, 4, 4)).getdata()), dtype=torch.float32)]


def batches(spec: str, start_batch: int = 0, num_workers: int = 2, **kw) -> list[dict]:
    loader = build_loader(
        spec,
        transform=first_pixels,
        micro_batch=4,
        rank=kw.pop("rank", 1),
        world_size=kw.pop("world_size", 2),
        num_workers=num_workers,
        seed=5,
        epoch=1,
        start_batch=start_batch,
        with_labels=True,
        **kw,
    )
    return list(loader)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["sample_id"], y["sample_id"])
        assert torch.equal(x["label"], y["label"])
        assert torch.equal(x["views"][0], y["views"][0])


@pytest.fixture
def served(tmp_path: Path, kit) -> Path:
    """Five shards of 13, 9, 20, 11, 15 samples (ids = labels) with both indexes."""
    folder = tmp_path / "data" / "train"
    kit.write_id_shards(folder, [13, 9, 20, 11, 15])
    records = json.loads((folder / INDEX_NAME).read_text())["shards"]
    (folder / WIDS_INDEX_NAME).write_text(json.dumps(wids_index(records, "s", None)))
    return folder


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_forward_only_stream_gives_the_members_of_a_file(fmt: int) -> None:
    raw = make_tar(fmt)
    from_file = [(m.name, m.size, read()) for m, read in iter_members(io.BytesIO(raw))]
    # read every third member only: the others are read past and discarded
    stream = ShortReads(raw)
    got = [(m.name, m.size, read() if i % 3 == 0 else None) for i, (m, read) in
           enumerate(iter_members(stream))]  # fmt: skip
    assert stream.seekable() is False and len(got) == len(from_file) == 40
    for i, (a, b) in enumerate(zip(got, from_file, strict=True)):
        assert a[:2] == b[:2] and (a[2] == b[2] if i % 3 == 0 else a[2] is None)
    with pytest.raises(EOFError):
        for _, read in iter_members(ShortReads(raw[: len(raw) // 2 + 100])):
            read()


def test_pipe_shards_equal_local_and_resume(served: Path) -> None:
    paths = sorted(served.glob("s-*.tar"))
    local = ",".join(map(str, paths))
    piped = f"pipe:cat {served}/s-{{000000..000004}}.tar"
    assert expand_shards(piped) == [f"pipe:cat {p}" for p in paths]
    full = batches(local)
    assert_same(batches(piped), full)  # index found beside the file the command reads
    assert_same(batches(piped, start_batch=3), full[3:])
    samples = list(read_samples(f"pipe:cat {paths[2]}", 4, 9, lambda i: i % 2 == 0, True))
    assert [i for i, _ in samples] == [4, 5, 6, 7, 8]
    assert [s.label for i, s in samples if s is not None] == [13 + 9 + 4, 13 + 9 + 6, 13 + 9 + 8]


def test_a_failing_pipe_is_an_unreadable_shard(tmp_path: Path) -> None:
    (i, sample), *_ = read_samples("pipe:exit 3", 0, 1, lambda i: True, False)
    assert i == 0 and sample is not None and "exited with status 3" in (sample.error or "")


def test_http_shards_equal_local_resume_and_index_from_the_server(served: Path) -> None:
    paths = sorted(served.glob("s-*.tar"))
    full = batches(",".join(map(str, paths)))
    with http_server(served.parent) as base:
        url = f"{base}/train/s-{{000000..000004}}.tar"
        assert_same(batches(url), full)
        assert_same(batches(url, start_batch=2), full[2:])
        assert_same(batches(f"{base}/train/"), full)  # a folder URL: shards from its index
        assert_same(batches(f"{base}/train/{WIDS_INDEX_NAME}"), full)  # or the index itself
        remote = expand_shards(url)
        assert read_index(remote, None).counts == [13, 9, 20, 11, 15]
        # the wids index is read first; without it the old index.json still serves
        old = json.loads((served / INDEX_NAME).read_text())
        (served / INDEX_NAME).write_text(json.dumps({**old, "shards": []}))
        assert read_index(remote, None).counts == [13, 9, 20, 11, 15]
        (served / WIDS_INDEX_NAME).unlink()
        (served / INDEX_NAME).write_text(json.dumps(old))
        assert read_index(remote, None).counts == [13, 9, 20, 11, 15]
        (served / INDEX_NAME).unlink()  # no index at all: the streams are scanned
        with pytest.warns(UserWarning, match="scanning"):
            assert read_index(remote, None).counts == [13, 9, 20, 11, 15]
        with pytest.raises(ValueError, match="no shard index"):
            expand_shards(f"{base}/train/")


def test_http_missing_shard_is_reported_by_name(served: Path) -> None:
    with http_server(served.parent) as base:
        (_sample_pos, sample), *_ = read_samples(
            f"{base}/train/nope.tar", 0, 1, lambda i: True, False
        )
        assert sample is not None and "404" in (sample.error or "")
        with pytest.raises(ValueError, match=r"s-000009\.tar is not listed"):
            read_index([f"{base}/train/s-000009.tar"], None)


def test_an_index_from_a_server_may_not_name_a_command(served: Path) -> None:
    (served / WIDS_INDEX_NAME).write_text(
        json.dumps({"shardlist": [{"url": "pipe:touch /tmp/owned", "nsamples": 3}]})
    )
    with http_server(served.parent) as base, pytest.raises(ValueError, match="may not name"):
        expand_shards(f"{base}/train/")


def test_s3_shards_equal_local_and_resume(served: Path) -> None:
    paths = sorted(served.glob("s-*.tar"))
    full = batches(",".join(map(str, paths)))
    with s3_server(served.parent, bucket="bkt"):
        url = "s3://bkt/train/s-{000000..000004}.tar"
        assert_same(batches(url), full)
        assert_same(batches(url, start_batch=3), full[3:])
        assert read_index(expand_shards(url), None).classes is None
        (_i, sample), *_ = read_samples("s3://bkt/train/none.tar", 0, 1, lambda i: True, False)
        assert sample is not None and "not found" in (sample.error or "")


def test_make_shards_writes_a_wids_index_with_the_counts(tmp_path: Path, kit) -> None:
    from vitssl.data_pipelines.make_shards import SourceItem

    images = tmp_path / "img"
    images.mkdir()
    items = []
    for n in range(7):
        (images / f"{n}.jpg").write_bytes(kit.jpeg_bytes(n))
        items.append(SourceItem(f"k{n}", str(images / f"{n}.jpg"), n % 2))
    index = write_shards(items, tmp_path / "out", max_samples=3, classes=["a", "b"])
    wids = json.loads((tmp_path / "out" / WIDS_INDEX_NAME).read_text())
    assert wids["__kind__"] == "wids-shard-index-v1" and wids["wids_version"] == 1
    assert [(e["url"], e["nsamples"]) for e in wids["shardlist"]] == [
        (r["name"], r["samples"]) for r in index["shards"]
    ]
    assert [e["nsamples"] for e in wids["shardlist"]] == [3, 3, 1]
    for entry in wids["shardlist"]:  # counts and sizes agree with the tar files themselves
        tar = tmp_path / "out" / entry["url"]
        assert entry["filesize"] == tar.stat().st_size
        with tarfile.open(tar) as t:
            assert len({m.name.split(".")[0] for m in t.getmembers()}) == entry["nsamples"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_index(expand_shards(str(tmp_path / "out")), None)
    assert got.counts == [3, 3, 1] and got.classes == ["a", "b"]
