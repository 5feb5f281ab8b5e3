"""Tiny shard fixtures: every test makes its own data in a tmp dir."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import webdataset as wds
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    """A small random JPEG that depends only on ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        for sample in samples:
            writer.write(sample)
        writer.close()


def write_id_shards(folder: Path, counts: list[int], prefix: str = "s") -> list[Path]:
    """Shards whose ``cls`` is a unique sample id (0, 1, 2, ... in shard order) + index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, next_id, records = [], 0, []
    for n, count in enumerate(counts):
        path = folder / f"{prefix}-{n:06d}.tar"
        samples = []
        for _ in range(count):
            samples.append(
                {
                    "__key__": f"id{next_id:06d}",
                    "jpg": jpeg_bytes(next_id),
                    "cls": str(next_id).encode(),
                }
            )
            next_id += 1
        write_tar(path, samples)
        paths.append(path)
        records.append({"name": path.name, "samples": count, "bytes": path.stat().st_size})
    index = {
        "shards": records,
        "num_samples": next_id,
        "classes": None,
        "created_by": "test",
        "options": {},
    }
    (folder / "index.json").write_text(json.dumps(index))
    return paths


def spec_of(paths: list[Path]) -> str:
    return ",".join(str(p) for p in paths)


@pytest.fixture
def id_shards(tmp_path: Path) -> list[Path]:
    """Six shards of 12 samples with ids 0..71."""
    return write_id_shards(tmp_path / "shards", [12] * 6)


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (tests/ is not a package, so no imports)."""
    return SimpleNamespace(
        jpeg_bytes=jpeg_bytes, write_tar=write_tar, write_id_shards=write_id_shards, spec_of=spec_of
    )
