"""The per-epoch sample plan: shard order, equal slots, and the in-slot shuffle.

Per epoch the shards are permuted from (seed, epoch) and their samples concatenated into one
sequence of T samples. It is cut into S = world_size * workers contiguous slots of
n = floor(T / (S * B)) * B samples (B = micro-batch); slot s covers [s * n, (s + 1) * n), so
a slot may start or end inside a shard and every slot yields the same number of batches.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across processes and Python runs)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard ``shard`` (index into the shard list), placed at
    ``offset`` in the stream they belong to."""

    shard: int
    start: int
    stop: int
    offset: int


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(mix_seed(seed, epoch, 0x5EED)).shuffle(order)
    return order


def samples_per_slot(total: int, slots: int, micro_batch: int) -> int:
    return total // (slots * micro_batch) * micro_batch


def slot_segments(
    counts: list[int], order: list[int], slot_start: int, slot_stop: int
) -> list[Segment]:
    """The pieces of shards that make up [slot_start, slot_stop) of the epoch sequence."""
    segments, base = [], 0
    for shard in order:
        lo, hi = max(slot_start, base), min(slot_stop, base + counts[shard])
        if lo < hi:
            segments.append(Segment(shard, lo - base, hi - base, lo - slot_start))
        base += counts[shard]
        if base >= slot_stop:
            break
    return segments


def buffer_shuffle(items: Iterable[int], size: int, rng: random.Random) -> Iterator[int]:
    """Shuffle through a buffer of ``size`` (items leave at most ``size`` places early/late)."""
    if size <= 1:
        yield from items
        return
    buffer: list[int] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
