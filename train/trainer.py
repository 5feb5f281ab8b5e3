"""The one training loop: any method, any ZeRO preset, CPU (gloo) or GPU (NCCL).

``run(cfg)`` builds a :class:`Trainer` from a validated :class:`RunConfig` and calls
``fit()``: it resumes when asked, trains for ``cfg.train.steps`` optimizer steps, runs the
periodic hooks (``train.hooks``), checkpoints, exports the encoder and returns the process
exit code (0, :data:`EXIT_REQUEUE` after a signal, :data:`EXIT_DIVERGED`).
The loop never looks at the method's name: it calls ``forward``, ``before_step`` and
``after_step``, and logs what ``forward`` returns.

Host syncs and the NaN rollback. A step reads nothing back from the device: its scalar
outputs are summed there and "the first non-finite step" is a device flag
(:class:`train.metrics.StepMetrics`). The flag is read, collectively, only before a hook
runs (logging, k-NN, monitors, pictures, checkpoints) or the run stops. Checkpoints are
therefore only ever written after a clean check, so when the flag names step ``s`` the
latest complete checkpoint before ``s`` is sound: the trainer reloads it (weights,
optimizer, teacher, RNG, :class:`TrainState`), cuts the logs back to it, replays the steps
up to ``s - 1`` on the same batches and seeds, skips the batch of step ``s`` (one global
batch; the step number is not consumed) and goes on. The replay is what makes the result
equal to an uninterrupted run that skipped that batch; the price of reading the flag late
is the steps between ``s`` and the check, thrown away. A preemption found at the same check
exits after the rollback; ``checkpoints/rollback.json`` makes the requeued run skip the same
batch and count the rollback. After ``train.max_rollbacks``
rollbacks the run stops with a one-line message and :data:`EXIT_DIVERGED`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vitssl.data_pipelines.transforms import model_input
from vitssl.models.methods.base import Method, StepContext
from vitssl.models.registry import create_method
from vitssl.train.checkpoint import (
    complete_checkpoints,
    ensure_writable,
    latest_complete,
    load_checkpoint,
    save_checkpoint,
)
from vitssl.train.cli import EXIT_DIVERGED
from vitssl.train.config import RunConfig, save_config
from vitssl.train.ds_config import build_ds_config
from vitssl.train.engine import build_engine
from vitssl.train.hooks import (
    Checkpoint,
    CollapseMonitor,
    Hook,
    LogScalars,
    OnlineKNNHook,
    Pictures,
    Window,
)
from vitssl.train.metrics import RunLogger, StepMetrics
from vitssl.train.preemption import EXIT_REQUEUE, StopFlag
from vitssl.train.run_plan import plan_run, set_weight_decay
from vitssl.train.schedules import warmup_cosine
from vitssl.train.weights import init_backbone, method_weights

COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""A dead rank fails the job after this long instead of hanging it."""

"""Exit code when the loss stayed non-finite through ``train.max_rollbacks`` rollbacks."""


class TrainingDiverged(RuntimeError):
    """Non-finite loss or gradient norm that rollbacks could not get past."""


def skip_cpu_inference_op() -> None:
    """Tell DeepSpeed not to JIT-compile its CPU shared-memory all-reduce op.

    On the CPU, DeepSpeed's communication backend compiles ``deepspeed_shm_comm`` (C++, about
    a minute on two cores, again for every new virtual-environment path) when it starts, but
    only its inference all-reduce uses it; training reduces through the gloo process group
    either way. ``deepspeed.ops.__compatible_ops__`` is the dict its builder consults (kept
    in the module, so an edit persists), and an op marked incompatible is not built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device, from torchrun's, deepspeed's or Slurm's environment."""
    import deepspeed

    from vitssl.train.dist_env import apply_dist_env, resolve_dist_env

    env = resolve_dist_env(os.environ)
    port_given = "MASTER_PORT" in os.environ
    apply_dist_env(env)
    if env.source == "default" and not port_given:
        os.environ["MASTER_PORT"] = str(_free_port())  # a lone process needs no fixed port
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        skip_cpu_inference_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


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


@dataclass
class RunPlan:
    """What the run will do, resolved once from the config, the world size and the data.

    The one place where derived quantities are computed (steps, batches, learning rate);
    every other part of the trainer reads them from here.
    """

    steps: int
    accum: int
    micro_world: int
    """Images per micro-step over all ranks (micro batch x world size)."""
    global_batch: int
    """Images per optimizer step (micro batch x accumulation x world size)."""
    batches_per_epoch: int
    """Micro-batches of one rank in one pass over the data."""
    steps_per_epoch: int

    @classmethod
    def resolve(cls, cfg: RunConfig, world: int, batches_per_epoch: int) -> RunPlan:
        accum = cfg.train.grad_accum
        return cls(
            steps=cfg.train.steps,
            accum=accum,
            micro_world=cfg.train.micro_batch * world,
            global_batch=cfg.global_batch(world),
            batches_per_epoch=batches_per_epoch,
            steps_per_epoch=max(1, batches_per_epoch // accum),
        )


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint saves (``meta.json``) and a resume or rollback
    restores. The data position (epoch, batch in epoch) is a pure function of
    ``samples_seen``; the random state is too: every micro-step reseeds torch from (seed,
    step, micro-step, rank), and the checkpoint keeps each rank's generator states besides.
    """

    seed: int
    step: int = 0
    """Optimizer steps completed."""
    samples_seen: int = 0
    """Images consumed over all ranks, skipped batches included."""
    rollbacks: int = 0
    """Rollbacks after a non-finite step so far (not restored by a rollback)."""
    skip_at: set[int] = field(default_factory=set)
    """Steps whose batch is skipped when reached (set by a rollback, consumed by the replay
    before any later checkpoint, so never in one; ``checkpoints/rollback.json`` keeps them
    for a resume from the checkpoint the rollback went back to, after a preemption)."""

    def position(self, plan: RunPlan) -> DataPosition:
        return data_position(self.samples_seen, plan.micro_world, plan.batches_per_epoch)

    def micro_seed(self, micro: int, rank: int) -> int:
        return step_seed(self.seed, self.step, micro, rank)

    def to_meta(self, plan: RunPlan, world: int) -> dict[str, Any]:
        pos = self.position(plan)
        return {
            "world_size": world,
            "epoch": pos.epoch,
            "batch_in_epoch": pos.batch,
            "samples_seen": self.samples_seen,
            "rollbacks": self.rollbacks,
        }

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.step = int(meta["step"])
        self.samples_seen = int(meta["samples_seen"])
        self.rollbacks = int(meta.get("rollbacks", 0))


def _to_device(
    batch: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    device_views: Any = None,
) -> dict[str, Any]:
    """Views to the device in the training dtype (uint8 views normalised there); with
    ``device_views`` the batch holds
    encoded JPEG bytes that are decoded and augmented there (data.decode_on_device)."""
    out = dict(batch)
    views = device_views(batch) if "jpeg" in batch else batch["views"]
    out.pop("jpeg", None)
    out["views"] = [model_input(v, device, dtype) for v in views]  # uint8: normalised here
    if "label" in batch:
        out["label"] = batch["label"].to(device)
    return out


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


@dataclass
class StepResult:
    """What one optimizer step leaves for the hooks (device tensors, not read yet)."""

    lr: float
    out: dict[str, Any]
    """The last micro-step's forward output."""
    batch: dict[str, Any]
    """The last micro-batch, on the device."""


def resume_path(cfg: RunConfig, ckpt_root: Path) -> Path | None:
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        return latest_complete(ckpt_root)
    path = Path(mode)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={mode!r}: no such checkpoint directory")
    return path


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[-1])


class Trainer:
    """One run: built from a config, driven by :meth:`fit`, one :meth:`train_step` at a time."""

    def __init__(self, cfg: RunConfig) -> None:
        self.rank, self.world, self.device = init_distributed()
        # a read-only output is one line here, not an OSError later
        ensure_writable(Path(cfg.train.output_dir))
        # epochs and global batch -> steps and accumulation at this world size (printed, saved)
        self.cfg = cfg = plan_run(cfg, self.world, self.rank)
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self._write_run_files()
        self.method, self.loader, self.device_views = self._build_method_and_data()
        self.plan = RunPlan.resolve(cfg, self.world, self.loader.batches_per_epoch)
        resume = resume_path(cfg, self.ckpt_root)
        self.built = build_engine(cfg, self.method, self.world, self.device, resume)
        self.engine = self.built.engine
        self.hooks = self._build_hooks()
        self.state = TrainState(seed=cfg.train.seed)
        self.batches: Batches
        if resume is not None:
            self._load(resume)
        else:
            self.batches = Batches(self.loader, self.state.position(self.plan))
        self.logger = RunLogger(
            self.run_dir,
            self.rank,
            self.plan.steps,
            self.state.step,
            cfg.log.progress,
            cfg.log.wandb_project if cfg.log.wandb else None,
            cfg.to_dict(),
        )
        if resume is not None:
            self.logger.event(self.state.step, resumed_from=str(resume))
            self.logger.write(f"resumed from {resume} at step {self.state.step}")
        self.metrics = StepMetrics(self.device, check_grad_norm=cfg.train.precision != "fp16")
        self.window = Window()
        self.last_ckpt = -1

    def _write_run_files(self) -> None:
        if self.rank == 0:
            save_config(self.cfg, self.run_dir / "config.json")
            ds_config = build_ds_config(self.cfg, self.world)
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    def _build_method_and_data(self) -> tuple[Method, Any, Any]:
        from vitssl.data_pipelines.device_augment import DeviceViews
        from vitssl.data_pipelines.loader import build_loader
        from vitssl.data_pipelines.transforms import build_transform

        cfg = self.cfg
        transform = build_transform(
            cfg.data.augmentation,
            cfg.model.img_size,
            local_crops=cfg.data.local_crops,
            local_crop_size=cfg.data.local_crop_size,
            uint8=cfg.data.uint8_views,
        )
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        method: Method = create_method(cfg.method, cfg.model, method_weights(cfg.method, cfg.model))
        init_backbone(method.backbone, cfg.model)
        loader = build_loader(
            cfg.data.train_shards,
            transform=transform,
            micro_batch=cfg.train.micro_batch,
            rank=self.rank,
            world_size=self.world,
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
            index_path=cfg.data.index or None,
            with_labels=method.uses_labels,
            max_skip_fraction=cfg.data.max_skip_fraction,
            resampled=cfg.data.resampled,
            decode_min_size=None if cfg.data.decode_on_device else transform.decode_min_size,
            decode_on_device=cfg.data.decode_on_device,
        )
        on_device = cfg.data.decode_on_device
        device_views = DeviceViews.from_transform(transform, self.device) if on_device else None
        return method, loader, device_views

    def _build_hooks(self) -> list[Hook]:
        from vitssl.train.evaluation.online import OnlineKNN

        log = self.cfg.log
        knn = OnlineKNN(
            self.cfg.data.val_shards, None, self.cfg.model.img_size, log.knn_every, max_samples=1000
        )
        return [
            LogScalars(log.every),
            OnlineKNNHook(log.knn_every, knn),
            CollapseMonitor(log.monitor_every),
            Pictures(log.image_every),
            Checkpoint(self.cfg.checkpoint.every),
        ]

    # ------------------------------------------------------------------ state on disk

    def _load(self, path: Path) -> None:
        """Collective: model, optimizer, teacher, RNG and :class:`TrainState` from ``path``,
        with the skips of a rollback made to this checkpoint (see :meth:`rollback`)."""
        meta = load_checkpoint(self.engine, path, self.rank, self.world)
        self.state.load_meta(meta)
        pending = self._pending_rollback()
        if pending is not None and int(pending["step"]) == self.state.step:
            self.state.skip_at.update(int(s) for s in pending["skip_at"])
            self.state.rollbacks = max(self.state.rollbacks, int(pending["rollbacks"]))
        self.batches = Batches(self.loader, self.state.position(self.plan))

    @property
    def _rollback_file(self) -> Path:
        return self.ckpt_root / "rollback.json"

    def _pending_rollback(self) -> dict[str, Any] | None:
        """Collective: rank 0's ``rollback.json`` (None without one), the same on every rank
        (node-local disks hold it on rank 0's only)."""
        pending: list[Any] = [None]
        if self.rank == 0 and self._rollback_file.is_file():
            pending[0] = json.loads(self._rollback_file.read_text())
        if dist.is_initialized():
            dist.broadcast_object_list(pending, src=0)
        return pending[0]

    def save(self) -> None:
        """Collective: a complete checkpoint of the current step."""
        meta = dict(self.state.to_meta(self.plan, self.world), config=self.cfg.to_dict())
        save_checkpoint(
            self.engine, self.ckpt_root, self.state.step, meta, self.cfg.checkpoint.keep, self.rank
        )
        self.last_ckpt = self.state.step

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> StepResult:
        """One optimizer step over ``accum`` micro-batches; reads nothing back from the device."""
        cfg, plan, state, engine = self.cfg, self.plan, self.state, self.engine
        ctx = StepContext(state.step, plan.steps, plan.steps_per_epoch)
        lr = warmup_cosine(
            state.step, plan.steps, self.built.peak_lr, cfg.optim.warmup_steps, cfg.optim.min_lr
        )
        for group in engine.optimizer.param_groups:
            group["lr"] = lr * self.method.lr_scale(group, ctx)
        set_weight_decay(engine.optimizer.param_groups, cfg.optim, state.step, plan.steps)
        self.method.before_step(ctx)
        if state.step + 1 in state.skip_at:
            self._skip_batch()
        self.metrics.start_step()
        out: dict[str, Any] = {}
        batch: dict[str, Any] = {}
        for micro in range(plan.accum):
            tw = time.perf_counter()
            raw = self.batches.next()
            batch = _to_device(raw, self.device, self.built.dtype, self.device_views)
            self.window.wait += time.perf_counter() - tw
            torch.manual_seed(state.micro_seed(micro, self.rank))
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            self.metrics.add(out, plan.accum)
        state.step += 1
        state.samples_seen += plan.global_batch
        self.window.steps += 1
        self.method.after_step(StepContext(state.step, plan.steps, plan.steps_per_epoch))
        self.metrics.end_step(state.step, engine.get_global_grad_norm())
        return StepResult(lr, out, batch)

    def _skip_batch(self) -> None:
        """Consume the data of one optimizer step without training on it."""
        self.state.skip_at.discard(self.state.step + 1)
        for _ in range(self.plan.accum):
            self.batches.next()
        self.state.samples_seen += self.plan.global_batch

    def fit(self) -> int:
        """Train to ``train.steps``; the process exit code."""
        stop = StopFlag()
        try:
            code = self._loop(stop)
        except TrainingDiverged as e:
            self.logger.event(self.state.step, diverged=str(e))
            if self.rank == 0:
                print(f"error: training diverged: {e}", file=sys.stderr, flush=True)
            code = EXIT_DIVERGED
        finally:
            stop.restore()
            self.logger.close()
        if code == 0 and self.last_ckpt == self.plan.steps:
            self._export()
        if dist.is_initialized():
            dist.barrier()
        return code

    def _loop(self, stop: StopFlag) -> int:
        while self.state.step < self.plan.steps:
            result = self.train_step()
            step = self.state.step
            preempted = stop.should_stop()
            stop_here = bool(self.cfg.train.stop_at) and step == self.cfg.train.stop_at
            due = [h for h in self.hooks if h.due(step, step == self.plan.steps)]
            if due or preempted or stop_here:
                bad = self.metrics.first_bad_step()
                if bad:
                    self.rollback(bad)
                    if preempted:  # the checkpoint just reloaded is where a requeue resumes
                        return EXIT_REQUEUE
                    continue
                for hook in due:
                    hook(self, result)
                self.window.restart()
            self.logger.progress(1)
            if preempted or stop_here:
                if self.last_ckpt != step:
                    self.save()
                self.logger.event(
                    step, stopped="signal" if preempted else "stop_at", checkpoint=step
                )
                self.logger.write(f"stopped at step {step} with a checkpoint; exit {EXIT_REQUEUE}")
                return EXIT_REQUEUE
        return 0

    def rollback(self, bad: int) -> None:
        """Collective: back to the last complete checkpoint before step ``bad``, whose batch
        will be skipped; :class:`TrainingDiverged` past ``train.max_rollbacks``."""
        limit = self.cfg.train.max_rollbacks
        if self.state.rollbacks >= limit:
            raise TrainingDiverged(
                f"non-finite loss or gradient norm at step {bad} after {self.state.rollbacks} "
                f"rollback(s) (train.max_rollbacks={limit})"
            )
        before = [p for p in complete_checkpoints(self.ckpt_root) if _step_of(p) < bad]
        if not before:
            raise TrainingDiverged(
                f"non-finite loss or gradient norm at step {bad}, before the first checkpoint "
                "(nothing to roll back to; lower checkpoint.every or the learning rate)"
            )
        rollbacks = self.state.rollbacks + 1
        self._load(before[-1])
        self.state.rollbacks = rollbacks
        self.state.skip_at.add(bad)
        if self.rank == 0:  # a preemption before the replay resumes here with the same skips
            tmp = self._rollback_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "step": self.state.step,
                        "skip_at": sorted(self.state.skip_at),
                        "rollbacks": rollbacks,
                    }
                )
            )
            tmp.replace(self._rollback_file)
        self.metrics.reset()
        self.window.restart()
        self.logger.rewind(self.state.step)
        self.logger.scalars(bad, {"train/rollbacks": float(rollbacks)})
        self.logger.event(bad, rollback={"to_step": self.state.step, "skip_step": bad})
        self.logger.write(
            f"WARNING: non-finite loss or gradient norm at step {bad}: rolled back to step "
            f"{self.state.step}, skipping that step's batch ({rollbacks}/{limit})"
        )

    def _export(self) -> None:
        from vitssl.train.export_encoder import export_encoder

        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            ckpt = self.ckpt_root / f"step_{self.plan.steps:08d}"
            out = export_encoder(ckpt, self.run_dir / "export")
            print(f"exported encoder: {out}", flush=True)


def run(cfg: RunConfig) -> int:
    """Train one run from its config; the process exit code."""
    return Trainer(cfg).fit()
