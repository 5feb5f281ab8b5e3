"""The embedded default dataset: ten classes of procedurally drawn shapes, no download.

Each image is a shape (circle, square, triangle, cross, star, ring, horizontal stripes,
vertical stripes, checker, diamond) at a random position, scale and small rotation, light
(random grey level, slightly tinted) on a plain dark background (random grey level, slightly
tinted), drawn at 4x and downsampled (antialiased). Shape is the signal and everything else
a small nuisance: with a random colour on a random gradient or noise background (the first
version, ``STYLE`` 1) colour dominated what a few CPU minutes of self-supervised training
learn, and every model of the demo chain stayed at chance (k-NN 16 %). Position, scale,
rotation and grey levels are the nuisance left (k-NN of raw pixels 91.8 %, of a random
ViT-tiny 25 %, of the demo's MAE 43.6 %: README, "Data: shards"). Every image depends only
on (seed, split, class, index): the same seed gives byte-identical shards for any number of
workers.

    python -m vitssl.data_pipelines.synthetic --out data/default \
        [--img-size 32 --train-per-class 200]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitssl.data_pipelines.make_shards import SourceItem, write_shards
from vitssl.data_pipelines.shard_index import INDEX_NAME

CLASSES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "ring",
    "hstripes",
    "vstripes",
    "checker",
    "diamond",
)
SPLITS = ("train", "val")
SUPERSAMPLE = 4
JPEG_QUALITY = 90
STYLE = 2
"""Version of the drawing, stored in the shard index: a folder of another style is rewritten."""
BACKGROUND_LEVEL = (0.0, 60.0)
"""Grey level of the background (0..255), plus a per-channel tint of +-BACKGROUND_TINT."""
BACKGROUND_TINT = 10.0
SHAPE_LEVEL = (170.0, 255.0)
"""Grey level of the shape, plus a per-channel tint of +-SHAPE_TINT."""
SHAPE_TINT = 20.0


def _rotate(
    points: np.ndarray, angle: float, center: tuple[float, float]
) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    moved = points @ rot.T + np.asarray(center)  # (N, 2)
    return [tuple(p) for p in moved.tolist()]


def _polygon(name: str) -> np.ndarray:
    """Unit-radius outline of the polygonal classes, centred on 0."""
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.75
    if name == "diamond":
        return np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]])
    if name == "triangle":
        return np.array([[0, -1], [0.87, 0.5], [-0.87, 0.5]])
    if name == "cross":
        a, b = 1.0, 0.3
        return np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ]
        )
    if name == "star":
        angles = np.arange(10) * math.pi / 5 - math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise AssertionError(name)


def draw_mask(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """'L' mask (255 = shape) of one class at ``size`` px (already supersampled)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    radius = size * rng.uniform(0.22, 0.4)
    cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
    angle = math.radians(rng.uniform(-15, 15))
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif name == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        inner = radius * rng.uniform(0.45, 0.65)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name in ("hstripes", "vstripes", "checker"):
        period = radius * rng.uniform(0.45, 0.7)
        grid = np.arange(size) - size / 2
        u, v = np.meshgrid(grid, grid)  # (size, size): u along x, v along y
        c, s = math.cos(angle), math.sin(angle)
        x, y = c * u + s * v, -s * u + c * v
        stripes_y = (np.floor(y / period) % 2) == 0
        stripes_x = (np.floor(x / period) % 2) == 0
        pattern = {"hstripes": stripes_y, "vstripes": stripes_x, "checker": stripes_x ^ stripes_y}[
            name
        ]
        patch = Image.fromarray((pattern * 255).astype(np.uint8))
        window = Image.new("L", (size, size), 0)
        box = [cx - radius * 1.2, cy - radius * 1.2, cx + radius * 1.2, cy + radius * 1.2]
        ImageDraw.Draw(window).rectangle(box, fill=255)
        mask.paste(patch, (0, 0), window)
    else:
        draw.polygon(_rotate(_polygon(name) * radius, angle, (cx, cy)), fill=255)
    return mask


def _tinted(level: tuple[float, float], tint: float, rng: np.random.Generator) -> np.ndarray:
    """An RGB colour (3,): a random grey level plus a small random tint per channel."""
    return np.clip(rng.uniform(*level) + rng.uniform(-tint, tint, size=3), 0, 255)


def render_image(class_id: int, img_size: int, rng: np.random.Generator) -> Image.Image:
    size = img_size * SUPERSAMPLE
    background = _tinted(BACKGROUND_LEVEL, BACKGROUND_TINT, rng)
    colour = _tinted(SHAPE_LEVEL, SHAPE_TINT, rng)  # >= 80 levels above the background, per channel
    mask = np.asarray(draw_mask(CLASSES[class_id], size, rng), dtype=np.float64)[..., None] / 255.0
    img = background * (1 - mask) + colour * mask  # (size, size, 3)
    big = Image.fromarray(img.astype(np.uint8))
    return big.resize((img_size, img_size), Image.Resampling.BOX)


def render_sample(path: str, seed: int, img_size: int) -> bytes:
    """JPEG bytes of the sample named ``split/class/index`` (the reader for write_shards)."""
    split, class_id, index = path.split("/")
    rng = np.random.default_rng([seed, SPLITS.index(split), int(class_id), int(index)])
    out = io.BytesIO()
    render_image(int(class_id), img_size, rng).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _options(split: str, per_class: int, img_size: int, seed: int, shard_size: int) -> dict:
    return {
        "synthetic": True,
        "style": STYLE,
        "split": split,
        "per_class": per_class,
        "img_size": img_size,
        "seed": seed,
        "shard_size": shard_size,
    }


def write_default_dataset(
    out_dir: Path,
    train_per_class: int = 200,
    val_per_class: int = 50,
    img_size: int = 32,
    seed: int = 0,
    shard_size: int = 500,
    workers: int = 1,
) -> dict:
    """Write ``out_dir/{train,val}/{split}-%06d.tar`` + index.json; return both indexes."""
    if img_size < 16:
        raise ValueError(f"img_size must be >= 16, got {img_size}")
    indexes = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        if per_class < 1:
            raise ValueError(f"{split}_per_class must be >= 1, got {per_class}")
        items = [
            SourceItem(f"{split}_{CLASSES[c]}_{i:06d}", f"{split}/{c}/{i}", c)
            for c in range(len(CLASSES))
            for i in range(per_class)
        ]
        indexes[split] = write_shards(
            items,
            Path(out_dir) / split,
            prefix=split,
            classes=list(CLASSES),
            max_samples=shard_size,
            workers=workers,
            shuffle_seed=seed,
            read=functools.partial(render_sample, seed=seed, img_size=img_size),
            options=_options(split, per_class, img_size, seed, shard_size),
        )
    return indexes


def is_up_to_date(
    out_dir: Path,
    train_per_class: int,
    val_per_class: int,
    img_size: int,
    seed: int,
    shard_size: int,
) -> bool:
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        path = out_dir / split / INDEX_NAME
        if not path.is_file():
            return False
        with open(path) as f:
            index = json.load(f)
        if index.get("options") != _options(split, per_class, img_size, seed, shard_size):
            return False
        if not all((out_dir / split / s["name"]).is_file() for s in index["shards"]):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vitssl.data_pipelines.synthetic", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (train/ and val/ inside)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    params = (args.train_per_class, args.val_per_class, args.img_size, args.seed, args.shard_size)
    if is_up_to_date(args.out, *params):
        print(f"{args.out}: up to date")
        return 0
    try:
        indexes = write_default_dataset(args.out, *params, workers=args.workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, index in indexes.items():
        print(f"{split}: {index['num_samples']} samples in {len(index['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
