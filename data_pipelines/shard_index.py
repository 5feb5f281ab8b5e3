"""Shard lists and the JSON indexes that make_shards writes beside them.

Two index formats are read: webdataset's wids index (``wids-index.json``, ``{"__kind__":
"wids-shard-index-v1", "wids_version": 1, "shardlist": [{"url", "nsamples"}, ...]}``, which
other tools read too) first, then the project's older ``index.json``. For remote shards the
index is fetched from the same place as the shards.
"""

from __future__ import annotations

import json
import os
import posixpath
import warnings
from dataclasses import dataclass
from urllib.parse import urlparse

from braceexpand import braceexpand

from vitssl.data_pipelines import shard_source
from vitssl.data_pipelines.tar_samples import count_samples

INDEX_NAME = "index.json"
"""The project's own index (read for shards written before the wids index existed)."""
WIDS_INDEX_NAME = "wids-index.json"
"""webdataset's wids shard index, written by make_shards and read first."""


@dataclass(frozen=True)
class ShardIndex:
    """Sample counts of an ordered list of shards."""

    shards: list[str]
    """Shard locations (paths, URLs, ``pipe:`` commands), in the order given by the user."""
    counts: list[int]
    """Samples per shard (same order)."""
    classes: list[str] | None
    """Class names (label i is classes[i]), or None for unlabelled / integer-labelled data."""

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside braces."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def expand_shards(spec: str) -> list[str]:
    """Shard specs -> shard locations. A spec is a brace pattern (``d/train-{000000..000009}.tar``,
    ``https://host/d/train-{0..9}.tar``, ``pipe:curl -s https://host/d/train-{0..9}.tar``), a
    comma list of them, a folder (local, or a URL ending in ``/``) whose index lists the
    shards, or a wids index (``*.json``). Local shards must exist; remote ones are opened when
    read (their index is fetched first, see ``read_index``)."""
    spec = spec.strip()
    listed = _listed_shards(spec)
    if listed is not None:
        return listed
    shards = [path for part in split_top_level(spec) for path in braceexpand(part)]
    if not shards:
        raise ValueError(f"no shards in {spec!r}")
    for path in shards:
        if shard_source.is_local(path) and not os.path.isfile(shard_source.local_path(path)):
            raise ValueError(f"shard not found: {path}")
    return shards


def _listed_shards(spec: str) -> list[str] | None:
    """The shards an index lists when ``spec`` is a folder or an index file, else None."""
    kind = shard_source.scheme(spec)
    if spec.endswith(".json") and kind != "pipe":
        index_files = [spec]
    elif kind in ("", "file") and os.path.isdir(shard_source.local_path(spec)):
        folder = shard_source.local_path(spec)
        index_files = [os.path.join(folder, WIDS_INDEX_NAME), os.path.join(folder, INDEX_NAME)]
        if not any(os.path.isfile(p) for p in index_files):
            names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
            return expand_shards(",".join(os.path.join(folder, n) for n in names))
    elif kind not in ("", "file", "pipe") and spec.endswith("/"):
        index_files = [spec + WIDS_INDEX_NAME, spec + INDEX_NAME]
    else:
        return None
    for path in index_files:
        loaded = _load_any_index(path)
        if loaded is not None:
            return [location for location, _ in loaded[0]]
    raise ValueError(f"no shard index at {index_files[0]}")


def load_index_json(path: str) -> dict:
    """The project's own index.json (``{"shards": [{"name", "samples", "bytes"}], ...}``)."""
    data = _parse_json(path, _read_required(path))
    if not isinstance(data, dict) or "shards" not in data:
        raise ValueError(f"{path} is not a shard index (no 'shards' list)")
    return data


def _read_required(path: str) -> bytes:
    raw = shard_source.read_small(path)
    if raw is None:
        raise ValueError(f"cannot read shard index {path}: not found")
    return raw


def _parse_json(path: str, raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read shard index {path}: {exc}") from exc


def _load_any_index(path: str) -> tuple[list[tuple[str, int]], list[str] | None] | None:
    """([(shard location, samples)], classes) from a wids index or an index.json at ``path``;
    None when there is no file there. Relative names resolve against the index's folder."""
    raw = shard_source.read_small(path)
    if raw is None:
        return None
    data = _parse_json(path, raw)
    folder = shard_source.parent(path) or ""
    if isinstance(data, dict) and isinstance(data.get("shardlist"), list):
        entries = [(str(e["url"]), int(e["nsamples"])) for e in _entries(data["shardlist"], path)]
    elif isinstance(data, dict) and isinstance(data.get("shards"), list):
        entries = [(str(e["name"]), int(e["samples"])) for e in _entries(data["shards"], path)]
    else:
        raise ValueError(f"{path} is neither a wids index nor an index.json")
    for name, _ in entries:
        shard_source.check_name_from_index(name, path)
    classes = data.get("classes")
    return [(shard_source.join(folder, name), n) for name, n in entries], classes


def _entries(items: list, path: str) -> list[dict]:
    if not all(isinstance(e, dict) for e in items):
        raise ValueError(f"{path}: malformed shard list")
    return items


def wids_index(records: list[dict], name: str, classes: list[str] | None) -> dict:
    """webdataset's wids index (``wids-shard-index-v1``) for make_shards' shard records:
    urls relative to the index, as wids resolves them; ``classes`` is an extra key."""
    index: dict = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [
            {"url": r["name"], "nsamples": r["samples"], "filesize": r["bytes"]} for r in records
        ],
    }
    if classes is not None:
        index["classes"] = classes
    return index


def read_index(shards: list[str], index_path: str | None) -> ShardIndex:
    """Counts for ``shards`` from the index: ``index_path``, else the wids index and then the
    index.json beside the first shard (fetched from the same server for remote shards).

    Without an index (or for ``pipe:`` shards without ``index_path``) the shards are scanned
    (tar headers only; a stream is read once) and a warning is given.
    """
    if not shards:
        raise ValueError("empty shard list")
    shards = [os.fspath(s) for s in shards]
    missing = [
        s
        for s in shards
        if shard_source.is_local(s) and not os.path.isfile(shard_source.local_path(s))
    ]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) missing, first: {missing[0]}")
    if index_path:  # None or "": find the index beside the shards
        loaded = _load_any_index(index_path)
        if loaded is None:
            raise ValueError(f"shard index not found: {index_path}")
        return _match(shards, *loaded, index_path)
    folder = shard_source.parent(shards[0])
    if folder is not None:
        for name in (WIDS_INDEX_NAME, INDEX_NAME):
            path = shard_source.join(folder, name)
            loaded = _load_any_index(path)
            if loaded is not None:
                return _match(shards, *loaded, path)
    warnings.warn(
        f"no {WIDS_INDEX_NAME} or {INDEX_NAME} beside {shards[0]}; counting samples by"
        " scanning shards",
        stacklevel=2,
    )
    return ShardIndex(list(shards), [count_samples(s) for s in shards], None)


def _match(
    shards: list[str], entries: list[tuple[str, int]], classes: list[str] | None, path: str
) -> ShardIndex:
    """Counts in the order of ``shards``: by full location, else by file name (a ``pipe:``
    shard matches the entry whose file name ends its command, e.g. ``curl -s URL``)."""
    by_location = dict(entries)
    by_name = {_basename(loc): n for loc, n in entries}
    counts = []
    for shard in shards:
        if shard in by_location:
            counts.append(by_location[shard])
            continue
        name = _basename(shard)
        if name not in by_name:
            raise ValueError(f"shard {name} is not listed in {path}")
        counts.append(by_name[name])
    return ShardIndex(list(shards), counts, classes)


def _basename(location: str) -> str:
    if shard_source.scheme(location) == "pipe":
        location = location.split()[-1] if location.split() else location
    return posixpath.basename(urlparse(location).path if "://" in location else location)
