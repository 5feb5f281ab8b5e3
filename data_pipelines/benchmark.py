"""Decode + augmentation throughput: our shards/loader vs a plain torchvision loader, like for like.

    python -m vitssl.data_pipelines.benchmark ../shared/data/imagenet-sample-500.tar --workers 2 \
        --repeat 4 --rounds 3
    python -m vitssl.data_pipelines.benchmark IMAGES.tar --resize-shorter 256   # resized-at-write
    python -m vitssl.data_pipelines.benchmark IMAGES.tar --device cuda --workers 8 --batch 128

**The baseline** is the loader a competent user writes: ``torchvision.datasets.ImageFolder``
(PIL decode) with the classic ``torchvision.transforms`` on PIL images, in a ``DataLoader``
with the same number of workers, shuffled, at ``--baseline-batch`` (64, which suits it:
fewer, larger inter-process transfers). Each preset's recipe is written the usual way, one
``Compose`` per view: ``RandomResizedCrop(size, scale, bicubic)`` + ``RandomHorizontalFlip``
(+ ``ColorJitter``/``RandomGrayscale``/``GaussianBlur``/``RandomSolarize`` where the preset
has them), then

* for our **float** path: ``ToTensor`` + ``Normalize`` (float32 normalised views);
* for our **uint8** path (``data.uint8_views``, the trainer's default, normalised on the
  device): ``PILToTensor`` (uint8 views, also normalised later).

Both sides read the same JPEG files (the baseline from a temporary ImageFolder, ours from
temporary shards of the same bytes); with ``--resize-shorter N`` every image is first
re-encoded at shorter side N (what ``make_shards --resize-shorter`` writes, an opt-in) and
both sides read those files. With ``--restart-markers`` our shards hold the same JPEGs
rewritten losslessly with a restart marker per MCU (``make_shards --restart-markers``, an
opt-in: the same pixels, ~7 % more bytes) and the baseline still reads the original files,
which PIL decodes ~6 % faster than the rewritten ones (its best case). Ours: the presets of
transforms.py through loader.py (libjpeg-turbo decode of only the region the drawn crops
cover, at the DCT scale that covers them; uint8 resize kernels).
The four loaders (baseline float, ours float, baseline uint8, ours uint8) run alternately
``--rounds`` times; the table gives medians of images/s per CPU core (throughput /
min(workers, cores)), CPU ms per image (main process + workers, start-up included), and
the median and each round's throughput ratio against the like baseline.

``--device cuda``: our loader with ``decode_on_device`` (workers only read bytes) feeding
``DeviceViews`` (nvJPEG decode + augmentation on the GPU) into MAE ViT-B/16 training steps
(bf16 autocast, AdamW); prints sustained images/s and the data-wait fraction (time blocked on
the loader + decode/augment, over the step time). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms as TV1
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader
from torchvision.datasets import ImageFolder

from vitssl.data_pipelines.loader import build_loader
from vitssl.data_pipelines.make_shards import SourceItem, encode_image, write_shards
from vitssl.data_pipelines.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    blur_kernel_size,
    build_transform,
)

BICUBIC = TV1.InterpolationMode.BICUBIC
BASELINE_BATCH = 64


def baseline_view(
    size: int,
    scale: tuple[float, float],
    jitter: tuple | None,
    blur_p: float,
    solarize_p: float,
    uint8: bool,
) -> TV1.Compose:
    """One view as a competent user writes it: classic torchvision transforms on PIL images
    (PIL's SIMD resize and colour ops), ending in ``ToTensor + Normalize`` (float) or
    ``PILToTensor`` (uint8, normalised on the device like our uint8 path)."""
    ops: list = [
        TV1.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC),
        TV1.RandomHorizontalFlip(),
    ]
    if jitter is not None:
        ops += [TV1.RandomApply([TV1.ColorJitter(*jitter)], p=0.8), TV1.RandomGrayscale(p=0.2)]
    if blur_p > 0:
        kernel = blur_kernel_size(size)
        ops.append(TV1.RandomApply([TV1.GaussianBlur(kernel, (0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(TV1.RandomSolarize(128, p=solarize_p))
    if uint8:
        ops.append(TV1.PILToTensor())
    else:
        ops += [TV1.ToTensor(), TV1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return TV1.Compose(ops)


def baseline_transform(
    preset: str, size: int, local_crops: int, uint8: bool = False
) -> Callable[[Image.Image], list]:
    """The same recipes written the usual torchvision way (one Compose per view)."""
    byol = (0.4, 0.4, 0.2, 0.1)

    def view(size: int, scale: tuple, jitter: tuple | None, blur: float, sol: float) -> Any:
        return baseline_view(size, scale, jitter, blur, sol, uint8)

    if preset == "mae":
        views = [view(size, (0.2, 1.0), None, 0.0, 0.0)]
    elif preset == "simclr":
        views = [view(size, (0.08, 1.0), (0.4, 0.4, 0.4, 0.1), 0.5, 0.0)] * 2
    elif preset == "byol":
        views = [view(size, (0.08, 1.0), byol, 1.0, 0.0), view(size, (0.08, 1.0), byol, 0.1, 0.2)]
    elif preset == "dino":
        scale = (0.4, 1.0) if local_crops else (0.14, 1.0)
        views = [view(size, scale, byol, 1.0, 0.0), view(size, scale, byol, 0.1, 0.2)]
        views += [view(96, (0.05, 0.4), byol, 0.5, 0.0)] * local_crops
    else:
        raise ValueError(f"no baseline for preset {preset!r}")
    return lambda img: [v(img) for v in views]


def time_loader(batches, limit: int) -> tuple[int, float, float]:
    """(images, seconds, CPU seconds per image): throughput over the batches after the first
    (worker start-up excluded); CPU time of this process and its reaped workers over all the
    images the loader produced (it is run to its end so that every worker has exited)."""
    cpu0 = _cpu_seconds()
    it = iter(batches)
    total = _batch_size(next(it))
    count, start, elapsed = 0, time.perf_counter(), 0.0
    for batch in it:
        total += _batch_size(batch)
        if count < limit:
            count += _batch_size(batch)
            elapsed = time.perf_counter() - start
    del it  # joins the workers: their CPU time is in RUSAGE_CHILDREN from now on
    return count, elapsed, (_cpu_seconds() - cpu0) / total


def _batch_size(batch) -> int:
    views = batch["views"] if isinstance(batch, dict) else batch[0]
    return views[0].shape[0]


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vitssl.data_pipelines.benchmark", description=__doc__.split("\n")[0]
    )
    p.add_argument("images_tar", type=Path, help="tar of JPEG files (flat)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--repeat", type=int, default=2, help="times the images are repeated in the stream"
    )
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="our loader's batch")
    p.add_argument("--baseline-batch", type=int, default=BASELINE_BATCH)
    p.add_argument("--presets", default="mae,simclr,byol,dino")
    p.add_argument("--local-crops", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="alternating baseline/ours runs")
    p.add_argument(
        "--resize-shorter",
        type=int,
        default=0,
        help="re-encode every image at this shorter side first (make_shards --resize-shorter);"
        " both loaders then read the same resized files",
    )
    p.add_argument(
        "--restart-markers",
        action="store_true",
        help="our shards are written with make_shards --restart-markers (lossless; the same"
        " pixels); the baseline reads the original files, on which it decodes faster",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu: table vs the baseline; cuda: GPU decode into MAE"
    )
    p.add_argument("--steps", type=int, default=50, help="--device cuda: timed training steps")
    args = p.parse_args(argv)
    if args.device != "cpu":
        return device_main(args)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dp_bench_") as tmp:
        folder, shards, n_items = _prepare(args, Path(tmp))
        rows = [
            _compare_preset(args, preset, folder, shards, n_items)
            for preset in args.presets.split(",")
        ]
    files = f", resized to shorter side {args.resize_shorter}" if args.resize_shorter else ""
    if args.restart_markers:
        files += ", ours with restart markers (make_shards --restart-markers)"
    print(
        f"\nmedians of {args.rounds} alternating rounds ({args.workers} workers, batch"
        f" {args.batch}, baseline batch {args.baseline_batch}, {n_items} images{files});"
        " float: normalised float32 views against ToTensor + Normalize; uint8: 8-bit views"
        " (data.uint8_views, the trainer's default) against PILToTensor. Ratios: median"
        " (per round)\n"
    )
    print(
        "| preset | baseline float img/s/core | ours float | ratio | baseline uint8 | ours uint8"
        " | ratio | CPU ms/img base / ours (float; uint8) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


def _compare_preset(
    args: argparse.Namespace, preset: str, folder: Path, shards: str, n_items: int
) -> str:
    """Alternate the four loaders ``args.rounds`` times on one preset; the table row."""
    cores = min(args.workers, os.cpu_count() or 1)
    local = args.local_crops if preset == "dino" else 0
    limit = n_items - 2 * max(args.batch, args.baseline_batch)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in LOADERS}
    for _ in range(args.rounds):
        for name in LOADERS:
            uint8 = name.endswith("_u8")
            if name.startswith("base"):
                dataset = ImageFolder(
                    str(folder.parent),
                    transform=baseline_transform(preset, args.img_size, local, uint8),
                )
                loader: Any = DataLoader(
                    ConcatDataset([dataset] * args.repeat),
                    batch_size=args.baseline_batch,
                    shuffle=True,
                    num_workers=args.workers,
                    drop_last=True,
                )
            else:
                tf = build_transform(preset, args.img_size, local_crops=local, uint8=uint8)
                loader = build_loader(
                    shards,
                    transform=tf,
                    micro_batch=args.batch,
                    rank=0,
                    world_size=1,
                    num_workers=args.workers,
                    seed=0,
                    decode_min_size=tf.decode_min_size,
                )
            n, t, cpu = time_loader(loader, limit)
            runs[name].append((n / t / cores, cpu))
    views = build_transform(preset, args.img_size, local_crops=local).num_views
    row = _row(preset, views, args.img_size, runs)
    print(row, flush=True)
    return row


LOADERS = ("base", "ours", "base_u8", "ours_u8")


def _row(preset: str, views: int, size: int, runs: dict[str, list[tuple[float, float]]]) -> str:
    """A table row: median throughput per core and CPU ms per image of each loader, and the
    median (and per-round values) of the throughput ratios against the like baseline."""
    med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in runs.items()}

    def ratio(name: str, base: str) -> str:
        per_round = [o[0] / b[0] for b, o in zip(runs[base], runs[name], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in per_round)
        return f"{statistics.median(per_round):.2f}x ({rounds})"

    cpu = "; ".join(
        f"{1e3 * med[b][1]:.1f} / {1e3 * med[o][1]:.1f}"
        for b, o in (("base", "ours"), ("base_u8", "ours_u8"))
    )
    return (
        f"| {preset} {views} views @{size} | {med['base'][0]:.1f} | {med['ours'][0]:.1f} "
        f"| {ratio('ours', 'base')} | {med['base_u8'][0]:.1f} | {med['ours_u8'][0]:.1f} "
        f"| {ratio('ours_u8', 'base_u8')} | {cpu} |"
    )


def _prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, int]:
    """An ImageFolder of the tar's images and shards of the same bytes (``--repeat`` times);
    with ``--resize-shorter`` the images are re-encoded first and both read the result."""
    folder = tmp / "folder" / "all"
    folder.mkdir(parents=True)
    with tarfile.open(args.images_tar) as tar:
        tar.extractall(folder, filter="data")
    files = sorted(f for f in folder.rglob("*.*") if f.is_file())
    if args.resize_shorter:
        for f in files:
            f.write_bytes(encode_image(f.read_bytes(), args.resize_shorter, 90))
    items = [
        SourceItem(f"r{r}_{i:05d}", str(f)) for r in range(args.repeat) for i, f in enumerate(files)
    ]
    write_shards(
        items,
        tmp / "shards",
        max_samples=256,
        workers=args.workers,
        shuffle_seed=0,
        restart_markers=args.restart_markers,
    )
    shards = ",".join(str(s) for s in sorted((tmp / "shards").glob("*.tar")))
    return folder, shards, len(items)


def device_main(args: argparse.Namespace) -> int:
    """Sustained images/s of GPU-decoded MAE batches into ViT-B/16 training steps."""
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: needs a CUDA GPU (torch.cuda.is_available() is False);"
            " run the CPU comparison without --device"
        )
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="dp_bench_") as tmp:
        _, shards, n_items = _prepare(args, Path(tmp))
        ips, wait = sustained_mae(
            shards,
            device,
            model="vit_base_patch16_224",
            img_size=args.img_size,
            patch_size=16,
            batch=args.batch,
            steps=args.steps,
            workers=args.workers,
        )
    print(f"\nMAE ViT-B/16 @{args.img_size}, batch {args.batch}, {args.workers} workers,")
    print(f"{args.steps} steps after {SUSTAINED_WARMUP} warm-up, {n_items} images in the shards\n")
    print("| device | images/s | data wait (loader + GPU decode/augment) |")
    print("| --- | --- | --- |")
    print(f"| {torch.cuda.get_device_name(device)} | {ips:.0f} | {wait:.1%} |")
    return 0


SUSTAINED_WARMUP = 5


def sustained_mae(
    shards: str,
    device: torch.device,
    *,
    model: str,
    img_size: int,
    patch_size: int,
    batch: int,
    steps: int,
    workers: int,
) -> tuple[float, float]:
    """(images/s, data-wait fraction) of MAE training fed from ``shards``: on CUDA the
    workers only read bytes and ``DeviceViews`` decodes with nvJPEG and augments on the GPU;
    on the CPU (dry runs) the workers decode to uint8 views. bf16 autocast, fused AdamW."""
    from vitssl.data_pipelines.device_augment import DeviceViews
    from vitssl.data_pipelines.transforms import model_input
    from vitssl.models.methods.mae import MAEConfig
    from vitssl.models.registry import create_method
    from vitssl.train.config import ModelSection

    cuda = device.type == "cuda"
    model_cfg = ModelSection(name=model, img_size=img_size, patch_size=patch_size)
    method = create_method(MAEConfig(), model_cfg).to(device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1.5e-4, fused=True)
    tf = build_transform("mae", img_size, uint8=True)
    views = DeviceViews.from_transform(tf, device) if cuda else None
    loader = build_loader(
        shards,
        transform=tf,
        micro_batch=batch,
        rank=0,
        world_size=1,
        num_workers=workers,
        seed=0,
        resampled=True,  # endless stream: as many steps as asked for
        decode_on_device=cuda,
        decode_min_size=None if cuda else tf.decode_min_size,
    )
    it = iter(loader)
    waited, images, start = 0.0, 0, time.perf_counter()
    for step in range(SUSTAINED_WARMUP + steps):
        if step == SUSTAINED_WARMUP:
            _sync(device)
            start, waited, images = time.perf_counter(), 0.0, 0
        t0 = time.perf_counter()
        data = next(it)
        imgs = views(data)[0] if views is not None else model_input(data["views"][0], device)
        _sync(device)  # decode + augment done: what the step waits for
        waited += time.perf_counter() - t0
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = method({"views": [imgs]})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images += batch
    _sync(device)
    elapsed = time.perf_counter() - start
    return images / elapsed, waited / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_jpeg_shards(out: Path, count: int, seed: int = 0) -> str:
    """Shards of ``count`` full-size (500x375, ImageNet's typical size) smooth random JPEGs,
    for checks on a machine without photos; returns the comma-separated shard paths."""
    gen = torch.Generator().manual_seed(seed)
    folder = out / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        small = torch.randint(0, 256, (3, 24, 32), generator=gen, dtype=torch.uint8)
        big = torch.nn.functional.interpolate(
            small[None].float(), size=(375, 500), mode="bilinear", align_corners=False
        )[0]
        pixels = big.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        items.append(SourceItem(f"s{i:05d}", str(path)))
    write_shards(items, out / "shards", max_samples=256, shuffle_seed=0)
    return ",".join(str(s) for s in sorted((out / "shards").glob("*.tar")))


if __name__ == "__main__":
    raise SystemExit(main())
