"""Shard lists and the JSON index that make_shards writes beside them."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from braceexpand import braceexpand

from data_pipelines.tar_samples import count_samples

INDEX_NAME = "index.json"


@dataclass(frozen=True)
class ShardIndex:
    """Sample counts of an ordered list of shards."""

    shards: list[str]
    """Shard paths, in the order given by the user."""
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
    """Brace pattern (``d/train-{000000..000009}.tar``), comma list, or a folder written by
    make_shards (its index.json lists the shards) -> existing shard paths."""
    if os.path.isdir(spec.strip()):
        folder = spec.strip()
        index = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index):
            names = [entry["name"] for entry in load_index_json(index)["shards"]]
        else:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
        spec = ",".join(os.path.join(folder, n) for n in names)
    shards = [path for part in split_top_level(spec) for path in braceexpand(part)]
    if not shards:
        raise ValueError(f"no shards in {spec!r}")
    for path in shards:
        if not os.path.isfile(path):
            raise ValueError(f"shard not found: {path}")
    return shards


def load_index_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read shard index {path}: {exc}") from exc
    if not isinstance(data, dict) or "shards" not in data:
        raise ValueError(f"{path} is not a shard index (no 'shards' list)")
    return data


def read_index(shards: list[str], index_path: str | None) -> ShardIndex:
    """Counts for ``shards`` from the index (default: index.json beside the first shard).

    Without an index file the shards are scanned (tar headers only) and a warning is given.
    """
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) missing, first: {missing[0]}")
    if not shards:
        raise ValueError("empty shard list")
    explicit = index_path is not None
    path = index_path or os.path.join(os.path.dirname(shards[0]), INDEX_NAME)
    if not os.path.isfile(path):
        if explicit:
            raise ValueError(f"shard index not found: {path}")
        warnings.warn(
            f"no {INDEX_NAME} beside {shards[0]}; counting samples by scanning shards", stacklevel=2
        )
        return ShardIndex(list(shards), [count_samples(s) for s in shards], None)
    data = load_index_json(path)
    by_name = {entry["name"]: int(entry["samples"]) for entry in data["shards"]}
    counts = []
    for shard in shards:
        name = os.path.basename(shard)
        if name not in by_name:
            raise ValueError(f"shard {name} is not listed in {path}")
        counts.append(by_name[name])
    return ShardIndex(list(shards), counts, data.get("classes"))
