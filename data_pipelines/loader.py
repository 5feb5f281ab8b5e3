"""The streaming loader: shards -> per-rank, per-worker batches of augmented views.

Plan (see slots.py): per epoch the shards are permuted from (seed, epoch) into one sequence,
cut into world_size * K equal contiguous slots (K = max(1, num_workers)); slot
``rank * K + worker`` is read by that worker, which forms whole batches, so every rank has
the same ``batches_per_epoch`` and global batch j of a rank comes from worker j % K (the
DataLoader round-robins over workers). Within a slot the order is buffer-shuffled from
(seed, epoch, slot). Augmentation is seeded per sample from (seed, epoch, global position),
so batches do not depend on num_workers, and ``start_batch`` resumes exactly: each worker
skips the samples of the batches it already produced without reading their images.

Unreadable samples (corrupt image, missing image member, truncated tar) are skipped and
counted; the slot continues with its next samples and finally wraps around to its own
start (repeats) so that batch counts stay equal. Resume fast-forwards over positions, so a
resume is exact unless an image that fails only at decode time lies in the skipped part.

A batch holds ``views`` (list of ``(B, 3, H, W)``), ``index`` (positions in the epoch's
stream), ``sample_id`` (each sample's position in the shard index: shard by shard, member by
member, the same in every epoch; cached per-sample data such as teacher features is keyed by
it), ``skipped`` and, with labels, ``label``.

With ``decode_on_device=True`` the workers only read and batch bytes: instead of ``views`` a
batch holds ``jpeg`` (list of B uint8 tensors: the encoded JPEG as 1-D, or for the rare
non-JPEG sample its CPU-decoded (3, H, W) pixels) and ``seed`` ((B,) int64, each sample's
augmentation seed); ``device_augment.DeviceViews`` turns it into ``views`` on the GPU with the
same per-sample draws as the CPU path.

Transforms that declare ``takes_bytes`` (the presets of transforms.py) get the encoded image
(``from_bytes``: libjpeg-turbo decode at the DCT scale that covers the drawn crops) and write
their views straight into the rows of the batch (``out=``, sized by their ``view_sizes``, of
their ``view_dtype``); others get a PIL image (``decode_min_size`` draft rule) and return
their views, which are stacked.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitssl.data_pipelines.decode import CorruptSample, decode_image, jpeg_or_pixels
from vitssl.data_pipelines.shard_index import ShardIndex, expand_shards, read_index
from vitssl.data_pipelines.slots import (
    Segment,
    buffer_shuffle,
    mix_seed,
    samples_per_slot,
    shard_order,
    slot_segments,
)
from vitssl.data_pipelines.tar_samples import RawSample, read_samples

__all__ = [
    "ShardLoader",
    "ShardStream",
    "TooManySkips",
    "build_loader",
    "expand_shards",
    "read_index",
]

log = logging.getLogger(__name__)
MIN_SEEN_FOR_SKIP_CHECK = 100
Transform = Callable[[Image.Image], list[Tensor]]


class TooManySkips(RuntimeError):
    """More than ``max_skip_fraction`` of the samples a worker saw were unreadable."""


@dataclass
class _Pulled:
    """A sample taken from the slot stream, with where it came from."""

    stream_pos: int
    raw: RawSample
    shard: int
    member: int


@dataclass
class _SkipCounter:
    max_fraction: float
    seen: int = 0
    skipped: int = 0
    since_batch: int = 0
    repeats: int = 0

    def good(self) -> None:
        self.seen += 1

    def bad(self, where: str, reason: str) -> None:
        self.seen += 1
        self.skipped += 1
        self.since_batch += 1
        if self.seen >= MIN_SEEN_FOR_SKIP_CHECK:
            self.check(where, reason)

    def check(self, where: str, reason: str) -> None:
        if self.skipped > self.max_fraction * self.seen:
            raise TooManySkips(
                f"{self.skipped} of {self.seen} samples unreadable (max_skip_fraction "
                f"{self.max_fraction}); last in {where}: {reason}"
            )


class ShardStream(IterableDataset):
    """Iterable of batches for one rank; each DataLoader worker reads one slot."""

    def __init__(
        self,
        index: ShardIndex,
        *,
        transform: Transform,
        micro_batch: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        with_labels: bool = False,
        max_skip_fraction: float = 0.01,
        resampled: bool = False,
        decode_min_size: int | None = None,
        shuffle_buffer: int = 500,
        decode_on_device: bool = False,
    ):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.index = index
        self.transform = transform
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.workers_per_rank = max(1, num_workers)
        self.seed = seed
        self.with_labels = with_labels
        self.max_skip_fraction = max_skip_fraction
        self.resampled = resampled
        self.decode_min_size = decode_min_size
        self.shuffle_buffer = shuffle_buffer
        self.decode_on_device = decode_on_device
        self._takes_bytes = bool(getattr(transform, "takes_bytes", False))
        self._views_out: list[Tensor] | None = None  # the batch being filled, see _batch_views
        self.epoch = 0
        self.start_batch = 0
        slots = world_size * self.workers_per_rank
        self.slot_size = samples_per_slot(index.num_samples, slots, micro_batch)
        if self.slot_size == 0:
            raise ValueError(
                f"{index.num_samples} samples are too few for {slots} slots (world_size x workers)"
                f" of micro_batch {micro_batch}"
            )
        self.batches_per_slot = self.slot_size // micro_batch
        self._first_sample = list(itertools.accumulate([0, *index.counts[:-1]]))

    @property
    def batches_per_epoch(self) -> int:
        return self.workers_per_rank * self.batches_per_slot

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0 or (not self.resampled and start_batch > self.batches_per_epoch):
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        k = self.workers_per_rank
        # DataLoader worker 0 must produce global batch start_batch: rotate the slots.
        logical = ((info.id if info is not None else 0) + self.start_batch) % k
        slot = self.rank * k + logical
        # batches this slot already produced: j < start_batch with j % k == logical
        done = max(0, -(-(self.start_batch - logical) // k))
        if self.resampled:
            yield from self._batches(self._resampled_samples(slot, logical, done), None)
        else:
            yield from self._batches(self._epoch_samples(slot, done), self.batches_per_slot - done)

    # ------------------------------------------------------------ sample streams

    def _pull(
        self, segments: Iterator[Segment], emission: Iterator[int], skip: int
    ) -> Iterator[_Pulled]:
        """Samples in emission order; the first ``skip`` emitted are never read."""
        skipped = set(itertools.islice(emission, skip))
        pending: dict[int, _Pulled] = {}

        def members() -> Iterator[_Pulled | None]:
            for seg in segments:
                path = self.index.shards[seg.shard]

                def keep(i: int, seg: Segment = seg) -> bool:
                    return seg.offset + i - seg.start not in skipped

                for i, raw in read_samples(path, seg.start, seg.stop, keep, self.with_labels):
                    pos = seg.offset + i - seg.start
                    yield None if raw is None else _Pulled(pos, raw, seg.shard, i)

        stream = members()
        for pos in emission:
            while pos not in pending:
                pulled = next(stream)
                if pulled is not None:
                    pending[pulled.stream_pos] = pulled
            yield pending.pop(pos)

    def _epoch_samples(self, slot: int, done: int) -> Iterator[tuple[_Pulled, int, int, int]]:
        """(sample, global position, augmentation seed, pass); passes > 0 are repeats."""
        order = shard_order(len(self.index.shards), self.seed, self.epoch)
        start = slot * self.slot_size
        segments = slot_segments(self.index.counts, order, start, start + self.slot_size)
        for repeat in itertools.count():
            rng = random.Random(mix_seed(self.seed, self.epoch, slot, 1))
            emission = buffer_shuffle(iter(range(self.slot_size)), self.shuffle_buffer, rng)
            skip = done * self.micro_batch if repeat == 0 else 0
            for pulled in self._pull(iter(segments), emission, skip):
                position = start + pulled.stream_pos
                yield pulled, position, mix_seed(self.seed, self.epoch, position, repeat), repeat

    def _resampled_samples(
        self, slot: int, logical: int, done: int
    ) -> Iterator[tuple[_Pulled, int, int, int]]:
        """Shards drawn with replacement from (seed, epoch, rank, worker); infinite."""
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, logical, 2))
        counts = self.index.counts

        def segments() -> Iterator[Segment]:
            offset = 0
            while True:
                shard = rng.randrange(len(counts))
                yield Segment(shard, 0, counts[shard], offset)
                offset += counts[shard]

        shuffle_rng = random.Random(mix_seed(self.seed, self.epoch, slot, 3))
        emission = buffer_shuffle(itertools.count(), self.shuffle_buffer, shuffle_rng)
        for pulled in self._pull(segments(), emission, done * self.micro_batch):
            sample_id = self._first_sample[pulled.shard] + pulled.member
            yield pulled, sample_id, mix_seed(self.seed, self.epoch, slot, pulled.stream_pos, 4), 0

    # ------------------------------------------------------------ decode, augment, batch

    def _augment(self, image: bytes, aug_seed: int, row: int) -> list[Tensor]:
        if self.decode_on_device:
            return [jpeg_or_pixels(image)]
        kwargs: dict[str, Any] = {}
        img: Image.Image | None = None  # for transforms that cannot decode (PIL images)
        if self._takes_bytes:  # the presets decode at the scale their drawn crops need
            kwargs["out"] = self._batch_views(row)
        else:
            img = decode_image(image, self.decode_min_size)
        generator = torch.default_generator  # CPU only: torch.manual_seed would queue CUDA seeds
        # never disturb the caller's RNG (num_workers=0 runs in the trainer); a worker's own
        # RNG serves nothing else, and saving it cost ~20 us per image
        saved = (generator.get_state(), random.getstate()) if get_worker_info() is None else None
        generator.manual_seed(aug_seed)
        random.seed(aug_seed)
        try:
            if img is None:
                return self.transform.from_bytes(image, **kwargs)  # type: ignore[attr-defined]
            return self.transform(img, **kwargs)
        finally:
            if saved is not None:
                generator.set_state(saved[0])
                random.setstate(saved[1])

    def _batch_views(self, row: int) -> list[Tensor]:
        """Row ``row`` of this batch's view tensors, which the preset writes into directly
        (in a DataLoader worker they live in shared memory: no stacking, no copy on send)."""
        if row == 0 or self._views_out is None:
            sizes = self.transform.view_sizes  # type: ignore[attr-defined]
            dtype = getattr(self.transform, "view_dtype", torch.float32)
            in_worker = get_worker_info() is not None
            if dtype == torch.uint8:  # channels-last: the presets' uint8 views are
                self._views_out = [  # (see transforms.resized_crop), so rows are plain copies
                    _empty((self.micro_batch, size, size, 3), dtype, in_worker).permute(0, 3, 1, 2)
                    for size in sizes
                ]
            else:
                self._views_out = [
                    _empty((self.micro_batch, 3, size, size), dtype, in_worker) for size in sizes
                ]
        return [v[row] for v in self._views_out]

    def _batches(
        self, samples: Iterator[tuple[_Pulled, int, int, int]], num_batches: int | None
    ) -> Iterator[dict]:
        counter = _SkipCounter(self.max_skip_fraction)
        produced, bad_run = 0, 0
        views: list[list[Tensor]] = []
        labels: list[int | None] = []
        positions: list[int] = []
        ids: list[int] = []
        seeds: list[int] = []
        where, reason = "", ""
        for pulled, position, aug_seed, repeat in samples:
            if num_batches is not None and produced >= num_batches:
                break
            raw = pulled.raw
            where = f"{self.index.shards[pulled.shard]} sample {pulled.member} ({raw.key or '?'})"
            try:
                if raw.error is not None:
                    raise CorruptSample(raw.error)
                assert raw.image is not None
                sample_views = self._augment(raw.image, aug_seed, len(positions))
            except CorruptSample as exc:
                reason = str(exc)
                counter.bad(where, reason)
                bad_run += 1
                if bad_run > self.slot_size:  # a whole pass over the slot without a good sample
                    raise TooManySkips(
                        f"no readable sample in slot; last in {where}: {reason}"
                    ) from None
                continue
            counter.good()
            bad_run = 0
            counter.repeats += repeat > 0
            views.append(sample_views)
            positions.append(position)
            ids.append(self._first_sample[pulled.shard] + pulled.member)
            seeds.append(aug_seed)
            if self.with_labels:
                labels.append(raw.label)
            if len(positions) == self.micro_batch:
                yield self._collate(views, labels, positions, ids, seeds, counter.since_batch)
                produced += 1
                counter.since_batch = 0
                views, labels, positions, ids, seeds = [], [], [], [], []
                if num_batches is not None and produced >= num_batches:
                    break  # before pulling on: that would read ahead into the next pass
        if counter.skipped:
            counter.check(where, reason)
            log.warning(
                "skipped %d unreadable of %d samples, repeated %d from the slot start",
                counter.skipped,
                counter.seen,
                counter.repeats,
            )

    def _collate(
        self,
        views: list[list[Tensor]],
        labels: list,
        positions: list[int],
        ids: list[int],
        seeds: list[int],
        skipped: int,
    ) -> dict:
        batch: dict = {}
        if self.decode_on_device:
            batch["jpeg"] = _pack([v[0] for v in views])  # 1-D encoded or (3, H, W) pixels
            batch["seed"] = torch.tensor(seeds, dtype=torch.long)
        elif self._views_out is not None:  # the preset wrote the rows in place
            batch["views"], self._views_out = self._views_out, None
        else:
            batch["views"] = [_stack(v) for v in zip(*views, strict=True)]  # each (B, 3, H, W)
        batch |= {
            "index": torch.tensor(positions, dtype=torch.long),
            # stable id of the sample: its position in the shard index (shard by shard,
            # member by member), whatever the epoch; cached teacher features are keyed by it
            "sample_id": torch.tensor(ids, dtype=torch.long),
            "skipped": skipped,
        }
        if self.with_labels:
            batch["label"] = torch.tensor(labels, dtype=torch.long)
        return batch


def _pack(items: list[Tensor]) -> list[Tensor]:
    """The 1-D items as views of one flat tensor (one shared-memory block per batch)."""
    flat_items = [t for t in items if t.dim() == 1]
    flat = torch.empty(sum(t.numel() for t in flat_items), dtype=torch.uint8)
    if get_worker_info() is not None:
        flat.share_memory_()
    if flat_items:
        torch.cat(flat_items, out=flat)
    views = iter(flat.split([t.numel() for t in flat_items]))
    return [next(views) if t.dim() == 1 else t for t in items]


def _stack(tensors: tuple[Tensor, ...]) -> Tensor:
    """Stack; in a DataLoader worker straight into shared memory (saves the copy on send)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    return torch.stack(tensors, out=_empty((len(tensors), *first.shape), first.dtype, True))


def _empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, shared: bool = False):
    """An uninitialised tensor; ``shared``: allocated in shared memory directly, as torch's
    default_collate does (``share_memory_()`` on a new tensor would first fault in and copy
    a private buffer: 0.3 ms per 224 px float view, a third of the MAE preset's decode)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


class ShardLoader:
    """Batches of one rank for one epoch (``set_epoch`` picks the epoch and resume point)."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream = stream
        self.num_workers = num_workers

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.stream.start_batch

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return iter(self.stream)
        loader = DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False
        )
        return iter(loader)


def build_loader(
    shards: str,
    *,
    transform: Transform,
    micro_batch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch: int = 0,
    start_batch: int = 0,
    index_path: str | None = None,
    with_labels: bool = False,
    max_skip_fraction: float = 0.01,
    resampled: bool = False,
    decode_min_size: int | None = None,
    shuffle_buffer: int = 500,
    decode_on_device: bool = False,
) -> ShardLoader:
    """Check the shards (missing ones fail here, by name) and build the rank's loader.

    ``decode_on_device``: batches carry the encoded images (``jpeg``) and per-sample seeds
    (``seed``) instead of ``views``; ``transform`` and ``decode_min_size`` are then not used
    here (build ``device_augment.DeviceViews`` from the same preset).
    """
    if decode_on_device and decode_min_size is not None:
        warnings.warn("decode_min_size is ignored with decode_on_device", stacklevel=2)
    paths = expand_shards(shards)
    index = read_index(paths, index_path)
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    slots = world_size * max(1, num_workers)
    if len(paths) < slots:
        warnings.warn(
            f"{len(paths)} shards for {slots} slots (world_size x workers): slots share shards",
            stacklevel=2,
        )
    stream = ShardStream(
        index,
        transform=transform,
        micro_batch=micro_batch,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        with_labels=with_labels,
        max_skip_fraction=max_skip_fraction,
        resampled=resampled,
        decode_min_size=decode_min_size,
        shuffle_buffer=shuffle_buffer,
        decode_on_device=decode_on_device,
    )
    stream.set_epoch(epoch, start_batch)
    return ShardLoader(stream, num_workers)
