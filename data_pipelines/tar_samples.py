"""Reading samples (groups of tar members sharing a key) from a shard, by position.

Members are grouped with webdataset's key rule (``base_plus_ext``). Members of samples that
are not wanted are skipped without being read; a truncated or unreadable tar yields the
remaining positions as errors instead of raising.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webdataset.tariterators import base_plus_ext

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """The encoded members of one sample; ``error`` says why it cannot be used."""

    key: str = ""
    image: bytes | None = None
    label: int | None = None
    error: str | None = None


def _members(path: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, str, str]]:
    """(tar, member, key, extension) for every regular file, in tar order."""
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            yield tar, info, key, ext.lower()
            tar.members = []  # type: ignore[attr-defined]  # streaming: do not keep every header in memory


def count_samples(path: str) -> int:
    """Number of samples (distinct consecutive keys) in a shard; reads headers only."""
    count, last = 0, None
    for _, _, key, _ in _members(path):
        if key != last:
            count, last = count + 1, key
    return count


def read_samples(
    path: str,
    start: int,
    stop: int | None,
    keep: Callable[[int], bool],
    with_labels: bool,
) -> Iterator[tuple[int, RawSample | None]]:
    """Yield (i, sample) for every i in [start, stop): ``None`` when ``keep(i)`` is false.

    Positions the shard does not have (truncated, unreadable tar) come as samples with an error.
    ``stop=None`` reads to the end; an unreadable tail then comes as one error sample.
    """
    position, current, current_key = -1, None, None
    next_pos = start
    try:
        for tar, info, key, ext in _members(path):
            if key != current_key:
                if current is not None:
                    yield position, _finish(current, with_labels)
                    next_pos = position + 1
                position, current_key = position + 1, key
                current = None
                if stop is not None and position >= stop:
                    return
                if position < start:
                    continue
                if not keep(position):
                    yield position, None
                    next_pos = position + 1
                    continue
                current = RawSample(key=key)
            if current is None:
                continue
            if ext in IMAGE_EXTENSIONS and current.image is None:
                current.image = _read(tar, info)
            elif ext == "cls" and with_labels:
                current.label = _parse_label(_read(tar, info), current)
        if current is not None:
            yield position, _finish(current, with_labels)
            next_pos = position + 1
        reason = "shard has fewer samples than its index"
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = f"unreadable tar ({exc})"
        if current is not None:  # usable if its image was read before the failure
            if current.image is None:
                current.error = reason
            yield position, _finish(current, with_labels)
            next_pos = position + 1
    if stop is None:
        if reason.startswith("unreadable"):
            yield max(next_pos, start), RawSample(error=reason)
        return
    for missing in range(max(next_pos, start), stop):
        yield missing, (RawSample(error=reason) if keep(missing) else None)


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    member = tar.extractfile(info)
    assert member is not None
    return member.read()


def _parse_label(data: bytes, sample: RawSample) -> int | None:
    try:
        return int(data.decode().strip())
    except ValueError:
        sample.error = f"bad cls value {data[:20]!r}"
        return None


def _finish(sample: RawSample, with_labels: bool) -> RawSample:
    if sample.error is None and sample.image is None:
        sample.error = "no image member"
    elif sample.error is None and with_labels and sample.label is None:
        sample.error = "no cls member"
    return sample
