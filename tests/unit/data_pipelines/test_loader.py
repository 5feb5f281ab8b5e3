from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import pytest
import torch

from vitssl.data_pipelines.loader import TooManySkips, build_loader, expand_shards, read_index
from vitssl.data_pipelines.slots import shard_order
from vitssl.data_pipelines.transforms import build_transform


def first_pixel(img) -> list:  # a cheap transform: one view of the top-left 4x4 pixels
    return [
        torch.tensor(list(img.crop((0, 0, 4, 4)).getdata()), dtype=torch.float32).T.reshape(3, 4, 4)
    ]


def spec_of(paths: list[Path]) -> str:
    return ",".join(str(p) for p in paths)


def load(paths, **kw) -> tuple[int, list[dict]]:
    args = dict(
        transform=first_pixel,
        micro_batch=4,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=3,
        with_labels=True,
    )
    args.update(kw)
    loader = build_loader(spec_of(paths), **args)
    return loader.batches_per_epoch, list(loader)


@pytest.mark.parametrize("counts", [[24] * 6, [10, 10, 100, 12]], ids=["equal", "one-10x-shard"])
def test_every_sample_once_per_epoch_across_ranks_and_workers(
    tmp_path: Path, kit, counts: list[int]
) -> None:
    paths = kit.write_id_shards(tmp_path, counts)
    total = sum(counts)
    slots, batch = 4, 4
    n = total // (slots * batch) * batch
    per_rank, ids, positions = [], [], []
    for rank in range(2):
        with pytest.warns(UserWarning) if len(counts) < slots else _nothing():
            bpe, batches = load(paths, rank=rank, world_size=2, num_workers=2, epoch=1)
        per_rank.append((bpe, len(batches)))
        for b in batches:
            assert b["views"][0].shape == (batch, 3, 4, 4)
            ids += b["label"].tolist()
            positions += b["index"].tolist()
    assert per_rank[0] == per_rank[1] == (2 * n // batch, 2 * n // batch)
    assert len(ids) == len(set(ids)) == slots * n
    assert sorted(positions) == list(range(slots * n))
    # The position is the place in the epoch's shard order: check it against the ids.
    order = shard_order(len(counts), 3, 1)
    starts = list(itertools.accumulate([0, *counts[:-1]]))
    epoch_ids = [starts[s] + i for s in order for i in range(counts[s])]
    assert all(epoch_ids[p] == i for p, i in zip(positions, ids, strict=False))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def views_by_position(batches: list[dict]) -> dict[int, list[torch.Tensor]]:
    out = {}
    for b in batches:
        for row, pos in enumerate(b["index"].tolist()):
            out[pos] = [v[row] for v in b["views"]]
    return out


def test_same_images_for_any_num_workers_and_across_runs(id_shards: list[Path]) -> None:
    tf = build_transform("simclr", 16)
    _, a = load(id_shards, transform=tf, num_workers=0)
    _, b = load(id_shards, transform=tf, num_workers=2)
    _, c = load(id_shards, transform=tf, num_workers=2)
    va, vb = views_by_position(a), views_by_position(b)
    assert sorted(va) == sorted(vb) == list(range(72))
    for pos in va:
        assert all(torch.equal(x, y) for x, y in zip(va[pos], vb[pos], strict=False))
    assert all(torch.equal(x["views"][1], y["views"][1]) for x, y in zip(b, c, strict=False))
    assert not torch.equal(va[0][0], va[0][1])  # two different views of one image


def test_uint8_batches_normalised_on_the_device_equal_the_float_batches(
    id_shards: list[Path],
) -> None:
    """What the trainer does with data.uint8_views: uint8 (B, 3, H, W) batches from the
    workers, normalised by model_input, equal the float batches (geometry-only preset)."""
    from vitssl.data_pipelines.transforms import model_input

    _, f32 = load(id_shards, transform=build_transform("mae", 16), num_workers=2)
    _, u8 = load(id_shards, transform=build_transform("mae", 16, uint8=True), num_workers=2)
    assert len(f32) == len(u8) == 18
    for a, b in zip(f32, u8, strict=True):
        assert b["views"][0].dtype == torch.uint8 and b["views"][0].shape == (4, 3, 16, 16)
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(model_input(b["views"][0], torch.device("cpu")), a["views"][0])


@pytest.mark.parametrize("num_workers,start", [(2, 3), (0, 5), (2, 8)])
def test_resume_gives_the_remaining_batches_bitwise(
    id_shards: list[Path], num_workers: int, start: int
) -> None:
    tf = build_transform("byol", 16)
    bpe, full = load(id_shards, transform=tf, num_workers=num_workers, epoch=2)
    _, resumed = load(id_shards, transform=tf, num_workers=num_workers, epoch=2, start_batch=start)
    assert len(resumed) == bpe - start
    for x, y in zip(full[start:], resumed, strict=False):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["label"], y["label"])
        assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"], strict=False))


def test_epochs_differ_and_rng_of_caller_is_untouched(id_shards: list[Path]) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _, e0 = load(id_shards)
    assert torch.equal(torch.rand(3), expected)
    _, e1 = load(id_shards, epoch=1)
    assert [b["index"].tolist() for b in e0] != [b["index"].tolist() for b in e1] or [
        b["label"].tolist() for b in e0
    ] != [b["label"].tolist() for b in e1]


def _damaged_shards(folder: Path, kit) -> list[Path]:
    paths = kit.write_id_shards(folder, [12, 12, 12])
    samples = [
        {"__key__": f"x{i:03d}", "jpg": kit.jpeg_bytes(1000 + i), "cls": b"%d" % (1000 + i)}
        for i in range(12)
    ]
    samples[2]["jpg"] = b"\xff\xd8\xff not a jpeg at all"  # corrupt image bytes
    del samples[5]["jpg"]  # missing image member
    kit.write_tar(paths[0], samples)
    # truncate shard 2 in the middle of sample 6's first header: samples 6..11 are lost
    with tarfile.open(paths[2]) as tar:
        cut = tar.getmembers()[12].offset + 100
    with open(paths[2], "r+b") as f:
        f.truncate(cut)
    return paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_samples_are_skipped_and_counted(tmp_path: Path, kit, num_workers: int) -> None:
    paths = _damaged_shards(tmp_path, kit)
    bpe, batches = load(paths, num_workers=num_workers, max_skip_fraction=0.5, micro_batch=2)
    assert len(batches) == bpe == 36 // 2
    # 8 unreadable; the wrap-around to the slot start may meet some of them again
    assert sum(b["skipped"] for b in batches) >= 1 + 1 + 6
    assert all(b["views"][0].shape[0] == 2 for b in batches)
    labels = [i for b in batches for i in b["label"].tolist()]
    readable = {1000 + i for i in range(12) if i not in (2, 5)} | set(range(12, 30))
    assert len(labels) == 36 and set(labels) == readable  # 28 readable + 8 repeats


@pytest.mark.parametrize("num_workers", [0, 2])
def test_too_many_skips_raises(tmp_path: Path, kit, num_workers: int) -> None:
    paths = _damaged_shards(tmp_path, kit)
    with pytest.raises(TooManySkips, match=r"of \d+ samples unreadable \(max_skip_fraction 0.1\)"):
        load(paths, num_workers=num_workers, max_skip_fraction=0.1, micro_batch=2)


def test_missing_shard_is_named_at_construction(id_shards: list[Path]) -> None:
    missing = id_shards[0].parent / "s-000099.tar"
    with pytest.raises(ValueError, match=r"s-000099\.tar"):
        build_loader(
            spec_of([*id_shards, missing]),
            transform=first_pixel,
            micro_batch=2,
            rank=0,
            world_size=1,
            num_workers=0,
            seed=0,
        )
    with pytest.raises(ValueError, match=r"s-000099\.tar"):
        read_index([*id_shards, missing], None)


def test_expand_shards_brace_and_comma(id_shards: list[Path]) -> None:
    folder = id_shards[0].parent
    assert expand_shards(f"{folder}/s-{{000000..000005}}.tar") == [str(p) for p in id_shards]
    assert expand_shards(f"{id_shards[0]}, {folder}/s-{{000001,000002}}.tar") == [
        str(p) for p in id_shards[:3]
    ]
    with pytest.raises(ValueError, match=r"s-000006\.tar"):
        expand_shards(f"{folder}/s-{{000000..000006}}.tar")
    with pytest.raises(ValueError, match="no shards"):
        expand_shards(" , ")
    # a folder: the shards its index lists, in the index's order (here: the same six)
    assert expand_shards(str(folder)) == [str(p) for p in id_shards]


def test_index_counts_and_scan_fallback(id_shards: list[Path]) -> None:
    index = read_index([str(p) for p in id_shards], None)
    assert index.counts == [12] * 6 and index.num_samples == 72
    (id_shards[0].parent / "index.json").unlink()
    with pytest.warns(UserWarning, match="scanning"):
        assert read_index([str(p) for p in id_shards[:2]], None).counts == [12, 12]


def test_resampled_stream_is_infinite_and_deterministic(id_shards: list[Path]) -> None:
    def take(n: int, start: int = 0) -> list[dict]:
        loader = build_loader(
            spec_of(id_shards),
            transform=first_pixel,
            micro_batch=4,
            rank=0,
            world_size=1,
            num_workers=0,
            seed=1,
            with_labels=True,
            resampled=True,
            start_batch=start,
        )
        assert loader.batches_per_epoch == 18
        return list(itertools.islice(iter(loader), n))

    a, b = take(50), take(50)
    assert len(a) == 50  # more than an epoch
    assert [x["label"].tolist() for x in a] == [x["label"].tolist() for x in b]
    assert all(x["index"].tolist() == x["label"].tolist() for x in a)  # index = stable sample id
    resumed = take(10, start=30)
    assert [x["label"].tolist() for x in resumed] == [x["label"].tolist() for x in a[30:40]]


def test_too_few_samples_is_a_value_error(id_shards: list[Path]) -> None:
    with pytest.raises(ValueError, match="too few"):
        load(id_shards, micro_batch=100, world_size=2, num_workers=1)


def test_an_epoch_reads_each_image_once(tmp_path: Path, kit, monkeypatch) -> None:
    """No read-ahead into the next pass at the end of an epoch (it read up to a shuffle
    buffer of images, 500 by default, only to drop them)."""
    import vitssl.data_pipelines.loader as loader_module

    paths = kit.write_id_shards(tmp_path, [20, 20, 20])
    read = []
    real = loader_module.read_samples

    def counting(*args, **kwargs):
        for i, sample in real(*args, **kwargs):
            if sample is not None and sample.image is not None:
                read.append(sample.key)
            yield i, sample

    monkeypatch.setattr(loader_module, "read_samples", counting)
    bpe, batches = load(paths, shuffle_buffer=50)
    assert len(batches) == bpe == 15  # 60 samples, batches of 4
    assert len(read) == len(set(read)) == 60
