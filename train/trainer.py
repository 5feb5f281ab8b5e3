"""The one training loop: any method, any ZeRO preset, CPU (gloo) or GPU (NCCL).

``run(cfg)`` builds everything from a validated :class:`RunConfig`, resumes when asked,
trains for ``cfg.train.steps`` optimizer steps, checkpoints, exports the encoder and
returns the process exit code (0, or :data:`EXIT_REQUEUE` after a signal).
The loop never looks at the method's name: it calls ``forward``, ``before_step`` and
``after_step``, and logs what ``forward`` returns.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipelines.transforms import model_input
from models.methods.base import Method, StepContext
from models.registry import create_method
from models.vit import token_parameters
from train.checkpoint import (
    ensure_universal,
    latest_complete,
    load_checkpoint,
    needs_universal,
    save_checkpoint,
)
from train.config import RunConfig, save_config
from train.ds_config import build_ds_config
from train.metrics import RunLogger, peak_memory_mb
from train.optim import build_optimizer
from train.preemption import EXIT_REQUEUE, StopFlag
from train.schedules import warmup_cosine

COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""A dead rank fails the job after this long instead of hanging it."""


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device, from torchrun's, deepspeed's or Slurm's environment."""
    import deepspeed

    from train.dist_env import apply_dist_env, resolve_dist_env

    env = resolve_dist_env(os.environ)
    port_given = "MASTER_PORT" in os.environ
    apply_dist_env(env)
    if env.source == "default" and not port_given:
        os.environ["MASTER_PORT"] = str(_free_port())  # a lone process needs no fixed port
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of one micro-step: masking and drop-path noise depend on nothing else."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


@dataclass
class DataPosition:
    epoch: int
    batch: int


def data_position(
    samples_seen: int, samples_per_batch: int, batches_per_epoch: int
) -> DataPosition:
    """Where the data stream stands after ``samples_seen`` images (a pure function).

    ``samples_per_batch`` is micro batch x world size. At an unchanged world size this is
    exact (resume continues at the next unseen sample of the epoch); after an elastic
    resume the run keeps its epoch and fraction of it, but the slot split, and so the
    order inside that epoch, follows the new world size.
    """
    consumed = samples_seen // samples_per_batch
    return DataPosition(consumed // batches_per_epoch, consumed % batches_per_epoch)


def _to_device(
    batch: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    device_views: Any = None,
) -> dict[str, Any]:
    """Views to the device in the training dtype (uint8 views normalised there); with
    ``device_views`` the batch holds
    encoded JPEG bytes that are decoded and augmented there (data.decode_on_device)."""
    out = dict(batch)
    views = device_views(batch) if "jpeg" in batch else batch["views"]
    out.pop("jpeg", None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out["views"] = [model_input(v, device, dtype, fmt) for v in views]  # uint8: normalised here
    if "label" in batch:
        out["label"] = batch["label"].to(device)
    return out


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


class Batches:
    """Endless micro-batches across epochs, starting at a data position."""

    def __init__(self, loader: Any, pos: DataPosition) -> None:
        self.loader = loader
        self.epoch = pos.epoch
        self.loader.set_epoch(pos.epoch, start_batch=pos.batch)
        self.it: Iterator[dict[str, Any]] = iter(self.loader)
        self.skipped = 0

    def next(self) -> dict[str, Any]:
        try:
            batch = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch, start_batch=0)
            self.it = iter(self.loader)
            batch = next(self.it)
        self.skipped += int(batch.get("skipped", 0))
        return batch


def run(cfg: RunConfig) -> int:
    import deepspeed

    from data_pipelines.device_augment import DeviceViews
    from data_pipelines.loader import build_loader
    from data_pipelines.transforms import build_transform

    rank, world, device = init_distributed()
    run_dir = Path(cfg.train.output_dir)
    ckpt_root = run_dir / "checkpoints"
    ds_config = build_ds_config(cfg, world)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    transform = build_transform(
        cfg.data.augmentation,
        cfg.model.img_size,
        local_crops=cfg.data.local_crops,
        local_crop_size=cfg.data.local_crop_size,
        uint8=cfg.data.uint8_views,
    )
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    method: Method = create_method(cfg.method, cfg.model)
    loader = build_loader(
        cfg.data.train_shards,
        transform=transform,
        micro_batch=cfg.train.micro_batch,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        index_path=cfg.data.index or None,
        with_labels=method.uses_labels,
        max_skip_fraction=cfg.data.max_skip_fraction,
        resampled=cfg.data.resampled,
        decode_min_size=None if cfg.data.decode_on_device else transform.decode_min_size,
        decode_on_device=cfg.data.decode_on_device,
    )
    device_views = (
        DeviceViews.from_transform(transform, device) if cfg.data.decode_on_device else None
    )
    accum = cfg.train.grad_accum
    steps_per_epoch = max(1, loader.batches_per_epoch // accum)

    _apply_speed_switches(method, cfg)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    if zero3:
        for p in token_parameters(method):
            deepspeed.zero.register_external_parameter(method, p)
    groups = method.param_groups(cfg.optim.weight_decay)
    global_batch = cfg.global_batch(world)
    peak_lr = cfg.optim.peak_lr(global_batch)
    optimizer = build_optimizer(
        cfg.optim.name,
        groups,
        peak_lr,
        cfg.optim.betas,
        cfg.optim.fused,
        cpu_offload=cfg.train.zero == "zero3_offload",
    )
    resume_path = _resume_path(cfg, ckpt_root)
    if resume_path is not None and needs_universal(resume_path, world):
        ensure_universal(resume_path, rank)
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        cfg.train.precision
    ]
    if hasattr(method, "teacher_to"):
        method.teacher_to(device, dtype)  # type: ignore[operator]

    from train.evaluation.online import OnlineKNN

    online_knn = OnlineKNN(
        cfg.data.val_shards, None, cfg.model.img_size, cfg.log.knn_every, max_samples=1000
    )
    step = 0
    samples_at_resume = 0
    if resume_path is not None:
        meta = load_checkpoint(engine, resume_path, rank, world)
        step = int(meta["step"])
        samples_at_resume = int(meta["samples_seen"])
    logger = RunLogger(
        run_dir, rank, cfg.train.steps, step, cfg.log.progress,
        cfg.log.wandb_project if cfg.log.wandb else None, cfg.to_dict(),
    )  # fmt: skip
    if resume_path is not None:
        logger.event(step, resumed_from=str(resume_path))
        logger.write(f"resumed from {resume_path} at step {step}")

    micro_world = cfg.train.micro_batch * world
    batches = Batches(
        loader, data_position(samples_at_resume, micro_world, loader.batches_per_epoch)
    )
    resumed_step = step
    stop = StopFlag()
    samples_per_step = global_batch
    exit_code = 0
    last_ckpt = -1
    try:
        while step < cfg.train.steps:
            ctx = StepContext(step, cfg.train.steps, steps_per_epoch)
            lr = warmup_cosine(
                step, cfg.train.steps, peak_lr, cfg.optim.warmup_steps, cfg.optim.min_lr
            )
            for group in engine.optimizer.param_groups:
                group["lr"] = lr * method.lr_scale(group, ctx)
            method.before_step(ctx)
            t0 = time.perf_counter()
            wait = 0.0
            parts: dict[str, float] = {}
            out: dict[str, Any] = {}
            batch: dict[str, Any] = {}
            for micro in range(accum):
                tw = time.perf_counter()
                batch = _to_device(
                    batches.next(), device, dtype, cfg.model.channels_last, device_views
                )
                wait += time.perf_counter() - tw
                torch.manual_seed(step_seed(cfg.train.seed, step, micro, rank))
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.ndim == 0:
                        parts[k] = parts.get(k, 0.0) + float(v.detach().float()) / accum
            step += 1
            method.after_step(StepContext(step, cfg.train.steps, steps_per_epoch))
            dt = time.perf_counter() - t0
            if not math.isfinite(parts["loss"]):
                raise FloatingPointError(f"loss is {parts['loss']} at step {step}")
            if step % cfg.log.every == 0 or step == cfg.train.steps:
                seen = samples_at_resume + (step - resumed_step) * samples_per_step
                _log_step(
                    logger,
                    engine,
                    device,
                    step,
                    parts,
                    lr,
                    dt,
                    wait,
                    samples_per_step,
                    seen,
                    batches,
                )
            if cfg.log.knn_every and step % cfg.log.knn_every == 0:
                with _gathered_direct_params(method, zero3):
                    knn = online_knn(step, method.backbone, device, dtype)  # collective
                if knn is not None:
                    logger.scalars(step, knn)
            if cfg.log.monitor_every and step % cfg.log.monitor_every == 0:
                _monitor_collapse(logger, step, out)
            if cfg.log.image_every and step % cfg.log.image_every == 0:
                with _gathered_direct_params(method, zero3):
                    img = method.visualize(batch)
                if img is not None:
                    logger.image(step, "images/method", img)
            logger.progress(1, {"loss": parts["loss"], "lr": lr})
            preempted = stop.should_stop(device)
            stop_here = cfg.train.stop_at and step == cfg.train.stop_at
            if (
                step % cfg.checkpoint.every == 0
                or step == cfg.train.steps
                or preempted
                or stop_here
            ):
                seen = samples_at_resume + (step - resumed_step) * samples_per_step
                _save(engine, cfg, ckpt_root, step, world, seen, loader, rank)
                last_ckpt = step
            if preempted or stop_here:
                logger.event(step, stopped="signal" if preempted else "stop_at", checkpoint=step)
                logger.write(f"stopped at step {step} with a checkpoint; exit {EXIT_REQUEUE}")
                exit_code = EXIT_REQUEUE
                break
    finally:
        stop.restore()
        logger.close()
    if exit_code == 0 and last_ckpt == cfg.train.steps:
        _export(cfg, ckpt_root, step, rank)
    if dist.is_initialized():
        dist.barrier()
    return exit_code


def _gathered_direct_params(method: Method, zero3: bool) -> Any:
    """Under ZeRO-3, gather the parameters no submodule's forward gathers (calls outside
    ``engine(batch)``, such as pictures); a no-op otherwise."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    params = list(method.parameters(recurse=False)) + token_parameters(method)
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _apply_speed_switches(method: Method, cfg: RunConfig) -> None:
    from models.speed import compile_blocks, fuse_layernorms, to_channels_last

    if cfg.model.fused_layernorm:
        fuse_layernorms(method)
    if cfg.model.channels_last:
        to_channels_last(method)
    if cfg.train.compile:
        compile_blocks(method)


def _resume_path(cfg: RunConfig, ckpt_root: Path) -> Path | None:
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        return latest_complete(ckpt_root)
    path = Path(mode)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={mode!r}: no such checkpoint directory")
    return path


def _save(
    engine: Any,
    cfg: RunConfig,
    root: Path,
    step: int,
    world: int,
    samples_seen: int,
    loader: Any,
    rank: int,
) -> None:
    pos = data_position(samples_seen, cfg.train.micro_batch * world, loader.batches_per_epoch)
    meta = {
        "world_size": world,
        "epoch": pos.epoch,
        "batch_in_epoch": pos.batch,
        "samples_seen": samples_seen,
        "config": cfg.to_dict(),
    }
    save_checkpoint(engine, root, step, meta, cfg.checkpoint.keep, rank)


def _log_step(
    logger: RunLogger,
    engine: Any,
    device: torch.device,
    step: int,
    parts: dict[str, float],
    lr: float,
    dt: float,
    wait: float,
    samples_per_step: int,
    samples_seen: int,
    batches: Batches,
) -> None:
    local = dict(parts)
    local["skipped"] = float(batches.skipped)
    mean = _mean_over_ranks(local, device)
    grad_norm = engine.get_global_grad_norm()
    values = {f"loss_metrics/{k}": v for k, v in mean.items() if k not in ("loss", "skipped")}
    values.update(
        {
            "loss": mean["loss"],
            "lr": lr,
            "throughput/images_per_s": samples_per_step / dt,
            "samples_seen": float(samples_seen),
            "time_metrics/data_loading(%)": 100.0 * wait / dt,
            "memory/peak_mb": peak_memory_mb(device),
            "data/skipped_samples": mean["skipped"] * _world_size(),
        }
    )
    if grad_norm is not None:  # DeepSpeed's global norm; absent with ZeRO-0 in fp32 unclipped
        values["grad_norm"] = float(grad_norm)
    logger.scalars(step, values)


def _monitor_collapse(logger: RunLogger, step: int, out: dict[str, Any]) -> None:
    """Collapse monitors on the method's two-view embeddings, when it returns them."""
    from models.collapse import collapse_metrics, collapse_warning

    embeddings = out.get("embeddings")
    if embeddings is None:
        return
    z1, z2 = (z.detach().float() for z in embeddings)
    metrics = collapse_metrics(z1, z2)
    logger.scalars(step, {f"collapse/{k}": v for k, v in metrics.items()})
    warning = collapse_warning(metrics)
    if warning:
        logger.event(step, collapse=warning)
        logger.write(f"WARNING step {step}: representation collapse suspected: {warning}")


def _export(cfg: RunConfig, ckpt_root: Path, step: int, rank: int) -> None:
    from train.export_encoder import export_encoder

    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        out = export_encoder(ckpt_root / f"step_{step:08d}", Path(cfg.train.output_dir) / "export")
        print(f"exported encoder: {out}", flush=True)
