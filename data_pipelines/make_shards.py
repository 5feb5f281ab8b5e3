"""Write images into WebDataset shards with a JSON index, and verify shards.

    python -m vitssl.data_pipelines.make_shards INPUT --out OUTDIR --prefix train \\
        [--max-samples 1000] [--max-bytes 500MB] [--resize-shorter 256 --jpeg-quality 90] \\
        [--restart-markers] [--workers N] [--shuffle-seed S | --no-shuffle] [--verify]
    python -m vitssl.data_pipelines.make_shards --verify-only OUTDIR

INPUT: an ImageFolder (class sub-folders, names sorted -> labels), a flat folder of images
(no labels), a CSV/TSV list (``path[,label]``, label an int or a class name; paths relative
to the list), or a tar / tar.gz of a folder (extracted to a temporary folder; a single
top-level folder is descended into).

``--restart-markers`` (opt-in) rewrites every JPEG losslessly with a restart marker after each
MCU (``decode.add_restart_markers``: the same pixels, ~7 % more bytes), so that the loader
decodes only the MCUs its random crops cover: ~20 % less decode time per crop of a full-size
photo. Without it the images are stored byte for byte as given.

``--max-bytes`` bounds the bytes of a shard's members (headers + padded data); the tar file
adds its end-of-archive blocks, rounded up to tar's 10 KiB records.

Determinism: the sample order (optionally shuffled from the seed) and the sample -> shard
assignment are fixed before any work starts; each worker process then writes whole shards,
so the shards are byte-identical for any ``--workers``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from vitssl.data_pipelines.decode import (
    EXTENSION_MISSING,
    CorruptSample,
    add_restart_markers,
    decode_image,
    region_decoder_available,
)
from vitssl.data_pipelines.shard_index import (
    INDEX_NAME,
    WIDS_INDEX_NAME,
    load_index_json,
    wids_index,
)
from vitssl.data_pipelines.tar_samples import read_samples

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CREATED_BY = "vitssl.data_pipelines.make_shards"
TAR_BLOCK = 512


@dataclass(frozen=True)
class SourceItem:
    """One input sample: ``path`` is handed to the reader, ``name`` becomes the key."""

    name: str
    path: str
    label: int | None = None


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- discovery of inputs


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p))


def sanitize_key(name: str) -> str:
    """A tar key without dots or slashes (webdataset splits keys at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _unique_keys(items: list[SourceItem]) -> list[SourceItem]:
    seen: set[str] = set()
    out = []
    for i, item in enumerate(items):
        key = sanitize_key(item.name)
        if key in seen:
            key = f"{key}_{i}"
        seen.add(key)
        out.append(SourceItem(key, item.path, item.label))
    return out


def discover_folder(root: Path) -> tuple[list[SourceItem], list[str] | None]:
    """ImageFolder when class sub-folders hold images, else a flat folder (no labels)."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _images_under(d))
    if class_dirs:
        classes = [d.name for d in class_dirs]
        items = [
            SourceItem(str(p.relative_to(root).with_suffix("")), str(p), label)
            for label, d in enumerate(class_dirs)
            for p in _images_under(d)
        ]
        return _unique_keys(items), classes
    items = [
        SourceItem(str(p.relative_to(root).with_suffix("")), str(p)) for p in _images_under(root)
    ]
    if not items:
        raise ValueError(f"no images found in {root}")
    return _unique_keys(items), None


def discover_list(list_file: Path) -> tuple[list[SourceItem], list[str] | None]:
    """CSV/TSV rows ``path[,label]``; an optional header row starts with ``path``."""
    delimiter = "\t" if list_file.suffix.lower() == ".tsv" else ","
    with open(list_file, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r and r[0].strip()]
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    if not rows:
        raise ValueError(f"no rows in {list_file}")
    base = list_file.parent
    paths = [base / r[0].strip() for r in rows]
    raw_labels = [r[1].strip() if len(r) > 1 and r[1].strip() else None for r in rows]
    labelled = [x for x in raw_labels if x is not None]
    if labelled and len(labelled) != len(rows):
        raise ValueError(f"{list_file}: some rows have a label and some do not")
    classes: list[str] | None = None
    labels: list[int | None] = [None] * len(rows)
    if labelled:
        if all(re.fullmatch(r"-?\d+", x) for x in labelled):
            labels = [int(x) for x in labelled]
        else:
            classes = sorted(set(labelled))
            lookup = {c: i for i, c in enumerate(classes)}
            labels = [lookup[x] for x in labelled]
    names = [
        str(p.relative_to(base).with_suffix("")) if p.is_relative_to(base) else p.stem
        for p in paths
    ]
    items = [SourceItem(n, str(p), lab) for n, p, lab in zip(names, paths, labels, strict=False)]
    return _unique_keys(items), classes


def extract_tar(archive: Path, into: Path) -> Path:
    """Extract a tar / tar.gz; return the folder to scan (a lone top-level folder is entered)."""
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(into)
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot extract {archive}: {exc}") from exc
    entries = [p for p in into.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return into


def discover(input_path: Path, scratch: Path) -> tuple[list[SourceItem], list[str] | None]:
    """Samples and class names of any supported input; tar inputs are extracted into scratch."""
    if not input_path.exists():
        raise ValueError(f"input not found: {input_path}")
    if input_path.is_dir():
        return discover_folder(input_path)
    if input_path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return discover_list(input_path)
    if tarfile.is_tarfile(input_path):
        return discover_folder(extract_tar(input_path, scratch))
    raise ValueError(f"unsupported input {input_path}: expected a folder, .csv/.tsv or .tar[.gz]")


# ---------------------------------------------------------------- encoding and writing


def encode_image(
    data: bytes, resize_shorter: int | None, quality: int, restart_markers: bool = False
) -> bytes:
    """Original JPEG bytes (checked to decode), or a re-encoded JPEG when resizing/converting;
    ``restart_markers``: then rewritten losslessly with a restart marker per MCU."""
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    if is_jpeg and resize_shorter is None:
        decode_image(data, min_size=64)  # a cheap DCT-scaled decode catches corrupt files
        return add_restart_markers(data) if restart_markers else data
    img = decode_image(data, min_size=resize_shorter)
    if resize_shorter is not None and min(img.size) > resize_shorter:
        scale = resize_shorter / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return add_restart_markers(out.getvalue()) if restart_markers else out.getvalue()


def tar_entry_bytes(payload: int) -> int:
    """Bytes a member of ``payload`` bytes takes in a tar (header + padded data)."""
    return TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK


def sample_bytes(image_bytes: int, labelled: bool) -> int:
    return tar_entry_bytes(image_bytes) + (tar_entry_bytes(8) if labelled else 0)


@dataclass(frozen=True)
class ShardJob:
    path: str
    items: list[SourceItem]
    resize_shorter: int | None
    quality: int
    read: Callable[[str], bytes]
    restart_markers: bool = False


def _load(
    item: SourceItem,
    job_read: Callable[[str], bytes],
    resize: int | None,
    quality: int,
    restart_markers: bool = False,
) -> bytes:
    try:
        data = job_read(item.path)
    except OSError as exc:
        raise CorruptSample(f"cannot read {item.path}: {exc.strerror or exc}") from exc
    return encode_image(data, resize, quality, restart_markers)


def write_one_shard(job: ShardJob) -> tuple[dict, list[str]]:
    """Write one shard; return its index record and the names of unreadable inputs."""
    skipped, count = [], 0
    tmp = job.path + ".tmp"
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        for item in job.items:
            try:
                image = _load(item, job.read, job.resize_shorter, job.quality, job.restart_markers)
            except CorruptSample:
                skipped.append(item.name)
                continue
            sample = {"__key__": item.name, "jpg": image}
            if item.label is not None:
                sample["cls"] = str(item.label).encode()
            writer.write(sample)
            count += 1
        writer.close()
    os.replace(tmp, job.path)
    record = {
        "name": os.path.basename(job.path),
        "samples": count,
        "bytes": os.path.getsize(job.path),
    }
    return record, skipped


def _encoded_size(
    item: SourceItem,
    read: Callable[[str], bytes],
    resize: int | None,
    quality: int,
    restart_markers: bool = False,
) -> int | None:
    try:
        return len(_load(item, read, resize, quality, restart_markers))
    except CorruptSample:
        return None


def assign_shards(
    sizes: Sequence[int], max_samples: int | None, max_bytes: int | None
) -> list[range]:
    """Consecutive ranges of samples per shard, bounded by count and by (tar) bytes."""
    ranges, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        full_count = max_samples is not None and i - start >= max_samples
        full_bytes = max_bytes is not None and i > start and used + size > max_bytes
        if full_count or full_bytes:
            ranges.append(range(start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        ranges.append(range(start, len(sizes)))
    return ranges


def _map(fn: Callable, jobs: Sequence, workers: int) -> Iterator:
    if workers <= 1 or len(jobs) <= 1:
        return map(fn, jobs)
    pool = multiprocessing.get_context("fork").Pool(min(workers, len(jobs)))
    try:
        return iter(pool.map(fn, jobs, chunksize=1))
    finally:
        pool.close()
        pool.join()


def write_shards(
    items: Sequence[SourceItem],
    out_dir: Path,
    *,
    prefix: str = "train",
    classes: list[str] | None = None,
    max_samples: int | None = 1000,
    max_bytes: int | None = None,
    resize_shorter: int | None = None,
    jpeg_quality: int = 90,
    workers: int = 1,
    shuffle_seed: int | None = 0,
    read: Callable[[str], bytes] = read_file,
    options: dict | None = None,
    restart_markers: bool = False,
) -> dict:
    """Write ``out_dir/{prefix}-%06d.tar``, ``out_dir/index.json`` and the same counts as a
    wids index (``out_dir/wids-index.json``); return the index.json content."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if not items:
        raise ValueError("no samples to write")
    order = list(items)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    out_dir.mkdir(parents=True, exist_ok=True)
    unreadable: list[str] = []
    labelled = any(item.label is not None for item in order)
    if max_bytes is None:
        sizes = [0] * len(order)
    elif (
        resize_shorter is None
        and not restart_markers
        and read is read_file
        and all(Path(i.path).suffix.lower() in (".jpg", ".jpeg") for i in order)
    ):
        sizes = [
            sample_bytes(os.path.getsize(i.path) if os.path.exists(i.path) else 0, labelled)
            for i in order
        ]
    else:  # re-encoded sizes are only known after encoding: a first (parallel) pass
        size_of = functools.partial(
            _encoded_size,
            read=read,
            resize=resize_shorter,
            quality=jpeg_quality,
            restart_markers=restart_markers,
        )
        encoded = list(_map(size_of, order, workers))
        unreadable = [item.name for item, size in zip(order, encoded, strict=False) if size is None]
        order = [item for item, size in zip(order, encoded, strict=False) if size is not None]
        sizes = [sample_bytes(size, labelled) for size in encoded if size is not None]
    jobs = [
        ShardJob(
            str(out_dir / f"{prefix}-{n:06d}.tar"),
            order[r.start : r.stop],
            resize_shorter,
            jpeg_quality,
            read,
            restart_markers,
        )
        for n, r in enumerate(assign_shards(sizes, max_samples, max_bytes))
    ]
    records = []
    for record, skipped in _map(write_one_shard, jobs, workers):
        records.append(record)
        unreadable.extend(skipped)
    if not any(r["samples"] for r in records):  # an empty data set is an error, not a result
        for job in jobs:
            Path(job.path).unlink(missing_ok=True)
        first = sorted(unreadable)[0] if unreadable else "none"
        raise ValueError(
            f"wrote 0 samples: all {len(items)} inputs were unreadable or missing (first: {first})"
        )
    index = {
        "shards": records,
        "num_samples": sum(r["samples"] for r in records),
        "classes": classes,
        "created_by": CREATED_BY,
        "options": options if options is not None else {},
        "unreadable": sorted(unreadable),
    }
    with open(out_dir / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    with open(out_dir / WIDS_INDEX_NAME, "w") as f:  # the format other webdataset tools read
        json.dump(wids_index(records, prefix, classes), f, indent=1)
        f.write("\n")
    return index


# ---------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    shards: int
    expected: int
    found: int
    mismatched: list[str]
    """Shards whose sample count differs from the index: ``name: found/expected``."""
    unreadable: list[str]
    """``shard/key: reason`` for every sample that does not decode."""

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.unreadable


def verify_shards(out_dir: Path) -> VerifyReport:
    """Decode every image of every shard listed in ``out_dir/index.json``."""
    index_path = out_dir / INDEX_NAME
    if not index_path.is_file():
        raise ValueError(f"no {INDEX_NAME} in {out_dir}")
    index = load_index_json(str(index_path))
    report = VerifyReport(len(index["shards"]), 0, 0, [], [])
    for entry in index["shards"]:
        path = out_dir / entry["name"]
        report.expected += entry["samples"]
        if not path.is_file():
            report.mismatched.append(f"{entry['name']}: missing file")
            continue
        found = 0
        for _, sample in read_samples(str(path), 0, None, lambda _: True, with_labels=False):
            assert sample is not None
            error = sample.error
            if error is None:
                assert sample.image is not None
                try:
                    decode_image(sample.image)
                except CorruptSample as exc:
                    error = str(exc)
            if error is not None and sample.key == "":  # unreadable tail of a truncated tar
                report.unreadable.append(f"{entry['name']}: {error}")
                continue
            found += 1
            if error is not None:
                report.unreadable.append(f"{entry['name']}/{sample.key}: {error}")
        report.found += found
        if found != entry["samples"]:
            report.mismatched.append(f"{entry['name']}: {found}/{entry['samples']} samples")
    return report


def print_report(report: VerifyReport) -> None:
    print(f"verified {report.shards} shards: {report.found}/{report.expected} samples")
    for line in report.mismatched:
        print(f"  count mismatch {line}")
    for line in report.unreadable:
        print(f"  unreadable {line}")
    print("OK" if report.ok else "FAILED")


# ---------------------------------------------------------------- command line


def parse_bytes(text: str) -> int:
    """``500MB``, ``2GiB``, ``100000`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (match.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = " KMGT".index(unit[:1]) if unit else 0
    return int(float(match.group(1)) * base**power)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitssl.data_pipelines.make_shards", description=__doc__.split("\n")[0]
    )
    p.add_argument("input", nargs="?", type=Path, help="folder, CSV/TSV list or tar(.gz) of images")
    p.add_argument("--out", type=Path, help="output folder for shards and index.json")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--max-samples", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--max-bytes", type=parse_bytes, default=None, help="bytes per shard, e.g. 500MB"
    )
    p.add_argument(
        "--resize-shorter", type=int, default=None, help="downscale shorter side to N px"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs")
    p.add_argument(
        "--restart-markers",
        action="store_true",
        help="rewrite JPEGs losslessly with a restart marker per MCU: faster random crops",
    )
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the global sample shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--verify", action="store_true", help="re-read and decode the shards afterwards")
    p.add_argument("--verify-only", type=Path, metavar="OUTDIR", help="only verify existing shards")
    return p


def run(args: argparse.Namespace) -> int:
    if args.verify_only is not None:
        report = verify_shards(args.verify_only)
        print_report(report)
        return 0 if report.ok else 1
    if args.input is None or args.out is None:
        raise ValueError("INPUT and --out are required (or --verify-only OUTDIR)")
    if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if args.restart_markers and not region_decoder_available():
        raise ValueError(f"--restart-markers needs {EXTENSION_MISSING}")
    options = {
        "input": str(args.input),
        "max_samples": args.max_samples,
        "max_bytes": args.max_bytes,
        "resize_shorter": args.resize_shorter,
        "jpeg_quality": args.jpeg_quality,
        "restart_markers": args.restart_markers,
        "shuffle_seed": None if args.no_shuffle else args.shuffle_seed,
    }
    with tempfile.TemporaryDirectory(prefix="make_shards_") as scratch:
        items, classes = discover(args.input, Path(scratch))
        index = write_shards(
            items,
            args.out,
            prefix=args.prefix,
            classes=classes,
            max_samples=args.max_samples,
            max_bytes=args.max_bytes,
            resize_shorter=args.resize_shorter,
            jpeg_quality=args.jpeg_quality,
            workers=args.workers,
            shuffle_seed=options["shuffle_seed"],
            options=options,
            restart_markers=args.restart_markers,
        )
    print(f"wrote {index['num_samples']} samples in {len(index['shards'])} shards to {args.out}")
    if index["unreadable"]:
        print(
            f"skipped {len(index['unreadable'])} unreadable inputs:"
            f" {', '.join(index['unreadable'][:20])}"
        )
    if args.verify:
        report = verify_shards(args.out)
        print_report(report)
        return 0 if report.ok else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
