"""Decode + augmentation throughput: our shards/loader vs a torchvision ImageFolder baseline.

    python -m data_pipelines.benchmark ../shared/data/imagenet-sample-500.tar --workers 2 --repeat 2

Both sides read the same JPEG files (the baseline from a temporary ImageFolder, ours from
temporary shards of the same bytes), use the same number of DataLoader workers and the same
batch size, and produce the same views. Baseline: PIL decode + torchvision.transforms.v2 on
PIL images (RandomResizedCrop, flip, ColorJitter, Grayscale, GaussianBlur, Solarize,
ToImage/ToDtype/Normalize). Ours: draft decode + the presets of transforms.py + loader.py.
Prints a markdown table of images/s per CPU core (throughput / min(workers, cores)).
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.datasets import ImageFolder

from data_pipelines.loader import build_loader
from data_pipelines.make_shards import SourceItem, write_shards
from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size, build_transform

BICUBIC = T.InterpolationMode.BICUBIC


def baseline_view(
    size: int, scale: tuple[float, float], jitter: tuple | None, blur_p: float, solarize_p: float
) -> T.Compose:
    ops: list = [
        T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if jitter is not None:
        ops += [T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=solarize_p))
    ops += [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return T.Compose(ops)


def baseline_transform(preset: str, size: int, local_crops: int) -> Callable[[Image.Image], list]:
    """The same recipes written the usual torchvision way (one Compose per view)."""
    byol = (0.4, 0.4, 0.2, 0.1)
    if preset == "mae":
        views = [baseline_view(size, (0.2, 1.0), None, 0.0, 0.0)]
    elif preset == "simclr":
        views = [baseline_view(size, (0.08, 1.0), (0.4, 0.4, 0.4, 0.1), 0.5, 0.0)] * 2
    elif preset == "byol":
        views = [
            baseline_view(size, (0.08, 1.0), byol, 1.0, 0.0),
            baseline_view(size, (0.08, 1.0), byol, 0.1, 0.2),
        ]
    elif preset == "dino":
        scale = (0.4, 1.0) if local_crops else (0.14, 1.0)
        views = [
            baseline_view(size, scale, byol, 1.0, 0.0),
            baseline_view(size, scale, byol, 0.1, 0.2),
        ]
        views += [baseline_view(96, (0.05, 0.4), byol, 0.5, 0.0)] * local_crops
    else:
        raise ValueError(f"no baseline for preset {preset!r}")
    return lambda img: [v(img) for v in views]


def time_loader(batches, limit: int) -> tuple[int, float]:
    """Images per second over the batches after the first (worker start-up excluded)."""
    it = iter(batches)
    next(it)
    count, start = 0, time.perf_counter()
    for batch in it:
        views = batch["views"] if isinstance(batch, dict) else batch[0]
        count += views[0].shape[0]
        if count >= limit:
            break
    return count, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.benchmark", description=__doc__.split("\n")[0]
    )
    p.add_argument("images_tar", type=Path, help="tar of JPEG files (flat)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--repeat", type=int, default=2, help="times the images are repeated in the stream"
    )
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--presets", default="mae,simclr,byol,dino")
    p.add_argument("--local-crops", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cores = min(args.workers, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="dp_bench_") as tmp:
        folder = Path(tmp) / "folder" / "all"
        folder.mkdir(parents=True)
        with tarfile.open(args.images_tar) as tar:
            tar.extractall(folder, filter="data")
        files = sorted(folder.rglob("*.*"))
        items = [
            SourceItem(f"r{r}_{i:05d}", str(f))
            for r in range(args.repeat)
            for i, f in enumerate(files)
        ]
        write_shards(
            items, Path(tmp) / "shards", max_samples=256, workers=args.workers, shuffle_seed=0
        )
        shards = ",".join(str(s) for s in sorted((Path(tmp) / "shards").glob("*.tar")))
        limit = len(items) - 2 * args.batch
        rows = []
        for preset in args.presets.split(","):
            local = args.local_crops if preset == "dino" else 0
            base_ds = ImageFolder(
                str(folder.parent), transform=baseline_transform(preset, args.img_size, local)
            )
            base: DataLoader = DataLoader(
                ConcatDataset([base_ds] * args.repeat),
                batch_size=args.batch,
                shuffle=True,
                num_workers=args.workers,
                drop_last=True,
            )
            n_base, t_base = time_loader(base, limit)
            ours_tf = build_transform(preset, args.img_size, local_crops=local)
            ours = build_loader(
                shards,
                transform=ours_tf,
                micro_batch=args.batch,
                rank=0,
                world_size=1,
                num_workers=args.workers,
                seed=0,
                decode_min_size=ours_tf.decode_min_size,
            )
            n_ours, t_ours = time_loader(ours, limit)
            b, o = n_base / t_base / cores, n_ours / t_ours / cores
            name = f"{preset} {ours_tf.num_views} views @{args.img_size}"
            rows.append(f"| {name} | {b:.1f} | {o:.1f} | {o / b:.2f}x |")
            print(rows[-1], flush=True)
    print(
        f"\nimages/s per CPU core ({args.workers} workers, batch {args.batch},"
        f" {len(items)} images)\n"
    )
    print(
        "| preset | baseline (ImageFolder + torchvision) | ours (shards + draft + loader) | ratio |"
    )
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
