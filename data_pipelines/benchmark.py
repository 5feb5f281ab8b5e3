"""Decode + augmentation throughput: our shards/loader vs a torchvision ImageFolder baseline.

    python -m data_pipelines.benchmark ../shared/data/imagenet-sample-500.tar --workers 2 --repeat 2
    python -m data_pipelines.benchmark IMAGES.tar --device cuda --workers 8 --batch 128

Both sides read the same JPEG files (the baseline from a temporary ImageFolder, ours from
temporary shards of the same bytes), use the same number of DataLoader workers and the same
batch size, and produce the same views. Baseline: PIL decode + torchvision.transforms.v2 on
PIL images (RandomResizedCrop, flip, ColorJitter, Grayscale, GaussianBlur, Solarize,
ToImage/ToDtype/Normalize). Ours: the presets of transforms.py through loader.py
(libjpeg-turbo decode at the DCT scale that covers the drawn crops, uint8 resize kernels),
twice: with float32 normalised views from the workers, as the baseline gives them, and with
8-bit views that the trainer normalises on the device (``data.uint8_views``, its default).
The loaders are run alternately ``--rounds`` times; the table gives medians of images/s per
CPU core (throughput / min(workers, cores)) and of CPU ms per image (main process + workers,
start-up included), and the median of the per-round throughput ratios.

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
    p.add_argument("--rounds", type=int, default=3, help="alternating baseline/ours runs")
    p.add_argument(
        "--device", default="cpu", help="cpu: table vs the baseline; cuda: GPU decode into MAE"
    )
    p.add_argument("--steps", type=int, default=50, help="--device cuda: timed training steps")
    args = p.parse_args(argv)
    if args.device != "cpu":
        return device_main(args)
    torch.set_num_threads(1)
    cores = min(args.workers, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="dp_bench_") as tmp:
        folder, shards, n_items = _prepare(args, Path(tmp))
        limit = n_items - 2 * args.batch
        rows = []
        for preset in args.presets.split(","):
            local = args.local_crops if preset == "dino" else 0
            base_ds = ImageFolder(
                str(folder.parent), transform=baseline_transform(preset, args.img_size, local)
            )
            ours_tf = {
                "ours": build_transform(preset, args.img_size, local_crops=local),
                "ours_u8": build_transform(preset, args.img_size, local_crops=local, uint8=True),
            }
            runs: dict[str, list[tuple[float, float]]] = {"base": [], "ours": [], "ours_u8": []}
            for _ in range(args.rounds):
                base: DataLoader = DataLoader(
                    ConcatDataset([base_ds] * args.repeat),
                    batch_size=args.batch,
                    shuffle=True,
                    num_workers=args.workers,
                    drop_last=True,
                )
                n, t, cpu = time_loader(base, limit)
                runs["base"].append((n / t / cores, cpu))
                for name, tf in ours_tf.items():
                    ours = build_loader(
                        shards,
                        transform=tf,
                        micro_batch=args.batch,
                        rank=0,
                        world_size=1,
                        num_workers=args.workers,
                        seed=0,
                        decode_min_size=tf.decode_min_size,
                    )
                    n, t, cpu = time_loader(ours, limit)
                    runs[name].append((n / t / cores, cpu))
            rows.append(_row(preset, ours_tf["ours"].num_views, args.img_size, runs))
            print(rows[-1], flush=True)
    print(
        f"\nmedians of {args.rounds} alternating rounds ({args.workers} workers,"
        f" batch {args.batch}, {n_items} images); float: normalised float32 views from the"
        " workers, as the baseline gives; uint8: 8-bit views normalised on the device"
        " (data.uint8_views, the trainer's default)\n"
    )
    print(
        "| preset | baseline img/s/core | ours float img/s/core | ratio | ours uint8 img/s/core"
        " | ratio | CPU ms/img baseline / float / uint8 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


def _row(preset: str, views: int, size: int, runs: dict[str, list[tuple[float, float]]]) -> str:
    """A table row: median throughput per core and CPU ms per image of each loader, and the
    median of the per-round throughput ratios against the baseline."""
    med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in runs.items()}

    def ratio(name: str) -> float:
        pairs = zip(runs["base"], runs[name], strict=True)
        return statistics.median(o[0] / b[0] for b, o in pairs)

    cpu = " / ".join(f"{1e3 * med[k][1]:.1f}" for k in ("base", "ours", "ours_u8"))
    return (
        f"| {preset} {views} views @{size} | {med['base'][0]:.1f} | {med['ours'][0]:.1f} "
        f"| {ratio('ours'):.2f}x | {med['ours_u8'][0]:.1f} | {ratio('ours_u8'):.2f}x | {cpu} |"
    )


def _prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, int]:
    """An ImageFolder of the tar's images and shards of the same bytes (``--repeat`` times)."""
    folder = tmp / "folder" / "all"
    folder.mkdir(parents=True)
    with tarfile.open(args.images_tar) as tar:
        tar.extractall(folder, filter="data")
    files = sorted(folder.rglob("*.*"))
    items = [
        SourceItem(f"r{r}_{i:05d}", str(f)) for r in range(args.repeat) for i, f in enumerate(files)
    ]
    write_shards(items, tmp / "shards", max_samples=256, workers=args.workers, shuffle_seed=0)
    shards = ",".join(str(s) for s in sorted((tmp / "shards").glob("*.tar")))
    return folder, shards, len(items)


def device_main(args: argparse.Namespace) -> int:
    """Sustained images/s of GPU-decoded MAE batches into ViT-B/16 training steps."""
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: needs a CUDA GPU (torch.cuda.is_available() is False);"
            " run the CPU comparison without --device"
        )
    from data_pipelines.device_augment import DeviceViews
    from models.methods.mae import MAEConfig
    from models.registry import create_method
    from train.config import ModelConfig

    device = torch.device(args.device)
    model_cfg = ModelConfig(name="vit_base_patch16_224", img_size=args.img_size, patch_size=16)
    method = create_method(MAEConfig(), model_cfg).to(device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1.5e-4, fused=True)
    tf = build_transform("mae", args.img_size)
    views = DeviceViews.from_transform(tf, device)
    with tempfile.TemporaryDirectory(prefix="dp_bench_") as tmp:
        _, shards, n_items = _prepare(args, Path(tmp))
        loader = build_loader(
            shards,
            transform=tf,
            micro_batch=args.batch,
            rank=0,
            world_size=1,
            num_workers=args.workers,
            seed=0,
            resampled=True,  # endless stream: as many steps as asked for
            decode_on_device=True,
        )
        it = iter(loader)
        warmup, waited, images = 5, 0.0, 0
        for step in range(warmup + args.steps):
            if step == warmup:
                torch.cuda.synchronize(device)
                start, waited, images = time.perf_counter(), 0.0, 0
            t0 = time.perf_counter()
            batch = next(it)
            batch["views"] = views(batch)
            torch.cuda.synchronize(device)  # decode + augment done: what the step waits for
            waited += time.perf_counter() - t0
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = method(batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            images += args.batch
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    print(f"\nMAE ViT-B/16 @{args.img_size}, batch {args.batch}, {args.workers} workers,")
    print(f"{args.steps} steps after {warmup} warm-up, {n_items} images in the shards\n")
    print("| device | images/s | data wait (loader + GPU decode/augment) |")
    print("| --- | --- | --- |")
    name = torch.cuda.get_device_name(device)
    print(f"| {name} | {images / elapsed:.0f} | {waited / elapsed:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
