"""Deterministic reading of every labelled sample, for evaluation (no shuffling, no dropping).

:class:`OrderedBatches` is the one walker over a source's samples in order; the teacher
cache (vitssl.train.cache_teacher) uses it too, unlabelled and with unreadable samples blanked.

A source is labelled WebDataset shards (brace pattern or comma list; keys ``jpg``/``png`` and
``cls``) or an ImageFolder directory (class sub-folders, sorted names -> labels). Samples are
numbered in source order (shard by shard, member by member; folders sorted); rank ``r`` of
``w`` reads the contiguous range ``[r * N // w, (r + 1) * N // w)`` in batches, each image
through the ``eval`` preset (resize to ``size / 0.875``, centre crop). Every batch carries
the global sample ``index`` so results can be gathered and ordered independently of the
number of ranks.

A sample without a label stops the reader with ``ValueError("... data has no labels ...")``;
an unreadable one stops it too (evaluation never silently changes its data set).
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitssl.data_pipelines.decode import CorruptSample, decode_pixels
from vitssl.data_pipelines.make_shards import is_image
from vitssl.data_pipelines.shard_index import expand_shards, read_index
from vitssl.data_pipelines.tar_samples import read_samples
from vitssl.data_pipelines.transforms import build_transform

NO_LABELS = "data has no labels"


@dataclass(frozen=True)
class LabelledSource:
    """What is read: shards with counts, or image files with labels; ``num_samples`` in all."""

    spec: str
    shards: list[str]
    counts: list[int]
    files: list[tuple[str, int]]
    classes: list[str] | None

    @property
    def num_samples(self) -> int:
        return sum(self.counts) if self.shards else len(self.files)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None


def open_source(spec: str, index: str | None = None) -> LabelledSource:
    """Shards (brace pattern, comma list, or a folder of shards with its index.json) or an
    ImageFolder directory (class sub-folders of images)."""
    if not spec:
        raise ValueError("no labelled data given")
    if os.path.isdir(spec) and not _is_shard_folder(spec):
        root = Path(spec)
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        files = [
            (str(p), label)
            for label, d in enumerate(class_dirs)
            for p in sorted(d.rglob("*"))
            if p.is_file() and is_image(p)
        ]
        if not files:
            raise ValueError(f"{spec}: {NO_LABELS} (no class sub-folders with images)")
        return LabelledSource(spec, [], [], files, [d.name for d in class_dirs])
    shards = expand_shards(spec)
    idx = read_index(shards, index)
    return LabelledSource(spec, list(idx.shards), list(idx.counts), [], idx.classes)


def _is_shard_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "index.json")) or any(
        name.endswith(".tar") for name in os.listdir(folder)
    )


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous sample range of one rank; sizes differ by at most one."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches of the largest rank; :class:`LabelledReader` pads every rank to this count."""
    largest = -(-num_samples // world_size)
    return -(-largest // batch_size)


class OrderedBatches(IterableDataset):
    """Batches of the samples ``[start, stop)`` of a source, in order, through the ``eval``
    preset; DataLoader worker ``w`` reads a contiguous share of them.

    Every batch holds ``image: (B, 3, S, S)`` and the global sample ``index: (B,)``; with
    ``labels`` also ``label: (B,)`` (a sample without one stops the reader). An unreadable
    sample stops the reader too, unless ``blank_unreadable``: it then becomes a black image
    and the batch carries ``ok: (B,)`` (False there), for callers that keep one row per
    sample and count the unreadable ones (the teacher cache).
    """

    def __init__(
        self,
        source: LabelledSource,
        start: int,
        stop: int,
        size: int,
        batch: int,
        *,
        labels: bool = True,
        blank_unreadable: bool = False,
    ) -> None:
        self.source = source
        self.start, self.stop = start, stop
        self.batch, self.size = batch, size
        self.labels, self.blank_unreadable = labels, blank_unreadable
        self.transform = build_transform("eval", size)
        self._first = list(itertools.accumulate([0, *source.counts]))

    def _encoded(self, start: int, stop: int) -> Iterator[tuple[int, bytes | None, int, str]]:
        """(global index, image bytes or None when unreadable, label or -1, where) for
        samples in [start, stop)."""
        if not self.source.shards:
            for i in range(start, stop):
                path, label = self.source.files[i]
                yield i, Path(path).read_bytes(), label, path
            return
        shard = bisect.bisect_right(self._first, start) - 1
        while start < stop and shard < len(self.source.shards):
            base = self._first[shard]
            lo, hi = start - base, min(stop, self._first[shard + 1]) - base
            path = self.source.shards[shard]
            for i, raw in read_samples(path, lo, hi, lambda _: True, with_labels=self.labels):
                assert raw is not None
                where = f"{path} sample {i} ({raw.key or '?'})"
                if raw.error == "no cls member":
                    raise ValueError(f"{self.source.spec}: {NO_LABELS} ({where} has no cls)")
                unlabelled = self.labels and raw.label is None
                readable = raw.error is None and raw.image is not None and not unlabelled
                if not readable and not self.blank_unreadable:
                    raise ValueError(f"unreadable sample {where}: {raw.error}")
                label = -1 if raw.label is None else raw.label
                yield base + i, raw.image if readable else None, label, where
            start = base + hi
            shard += 1

    def _image(self, data: bytes | None, where: str) -> Tensor | None:
        """The eval view, or None for an unreadable sample when ``blank_unreadable``."""
        try:
            if data is None:
                raise CorruptSample("unreadable")
            # the same decode as the training loader (decoder + DCT scale)
            return self.transform(decode_pixels(data, self.transform.decode_min_size))[0]
        except CorruptSample as e:
            if self.blank_unreadable:
                return None
            raise ValueError(f"unreadable sample {where}: {e}") from None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        nb = -(-(self.stop - self.start) // self.batch)
        b0, b1 = nb * worker // workers, nb * (worker + 1) // workers
        lo = self.start + b0 * self.batch
        hi = min(self.stop, self.start + b1 * self.batch)
        rows: list[tuple[Tensor | None, int, int]] = []
        for i, data, label, where in self._encoded(lo, hi):
            rows.append((self._image(data, where), label, i))
            if len(rows) == self.batch:
                yield self._collate(rows)
                rows = []
        if rows:
            yield self._collate(rows)

    def _collate(self, rows: list[tuple[Tensor | None, int, int]]) -> dict:
        blank = torch.zeros(3, self.size, self.size)
        batch = {"image": torch.stack([img if img is not None else blank for img, _, _ in rows])}
        if self.labels:
            batch["label"] = torch.tensor([label for _, label, _ in rows], dtype=torch.long)
        batch["index"] = torch.tensor([i for _, _, i in rows], dtype=torch.long)
        if self.blank_unreadable:
            batch["ok"] = torch.tensor([img is not None for img, _, _ in rows])
        return batch


def _collate(imgs: list[Tensor], labels: list[int], index: list[int]) -> dict:
    return {
        "image": torch.stack(imgs),  # (B, 3, S, S)
        "label": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(index, dtype=torch.long),
    }


class LabelledReader:
    """Batches ``{"image", "label", "index"}`` of one rank's share of all samples, in order.

    With ``pad=True`` every rank yields the same number of batches (:func:`batches_per_rank`):
    ranks with fewer samples add one-image batches with ``index = -1``. Collective forwards
    (ZeRO-3 gathers parameters in every forward) need that.
    """

    def __init__(
        self,
        spec: str,
        img_size: int,
        *,
        index: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        limit: int | None = None,
        pad: bool = False,
    ) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        self.source = open_source(spec, index)
        self.img_size = img_size
        self.num_samples = self.source.num_samples
        if limit is not None:
            self.num_samples = min(self.num_samples, limit)
        if self.num_samples < 1:
            raise ValueError(f"{spec}: no samples")
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pad = pad
        self.start, self.stop = rank_range(self.num_samples, rank, world_size)

    @property
    def classes(self) -> list[str] | None:
        return self.source.classes

    @property
    def num_batches(self) -> int:
        if self.pad:
            return batches_per_rank(self.num_samples, self.world_size, self.batch_size)
        return -(-(self.stop - self.start) // self.batch_size)

    def _stream(self, start: int, stop: int) -> Iterator[dict]:
        if start >= stop:
            return iter(())
        data = OrderedBatches(self.source, start, stop, self.img_size, self.batch_size)
        workers = min(self.num_workers, -(-(stop - start) // self.batch_size))
        if workers == 0:
            return iter(data)
        return iter(DataLoader(data, batch_size=None, num_workers=workers))

    def __iter__(self) -> Iterator[dict]:
        produced = 0
        for batch in self._stream(self.start, self.stop):
            produced += 1
            yield batch
        while self.pad and produced < self.num_batches:
            produced += 1
            size = self.img_size
            yield {
                "image": torch.zeros(1, 3, size, size),
                "label": torch.zeros(1, dtype=torch.long),
                "index": torch.full((1,), -1, dtype=torch.long),
            }

    def read(self, indices: list[int]) -> dict:
        """The samples at these global indices (any rank, any order), as one batch."""
        wanted = sorted(set(indices))
        got: dict[int, tuple[Tensor, int]] = {}
        for i in wanted:  # neighbours are scattered: read each on its own (few images)
            data = OrderedBatches(self.source, i, i + 1, self.img_size, 1)
            batch = next(iter(data))
            got[i] = (batch["image"][0], int(batch["label"][0]))
        return _collate([got[i][0] for i in indices], [got[i][1] for i in indices], indices)


def has_labels(spec: str, index: str | None = None) -> bool:
    """Whether the first sample of the source carries a label (reads one sample)."""
    source = open_source(spec, index)
    if not source.shards:
        return True
    for _, raw in read_samples(source.shards[0], 0, 1, lambda _: True, with_labels=True):
        return raw is not None and raw.label is not None
    return False
