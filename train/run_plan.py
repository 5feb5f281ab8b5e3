"""Run length and batch in the papers' units, resolved once at start for the actual cluster.

Recipes state ``train.epochs``, ``optim.warmup_epochs`` and a target ``train.global_batch``
(the numbers in the papers' tables). :func:`resolve_run_plan` turns them into optimizer
steps and gradient accumulation for the data set size and world size of this run, so that
changing the node count no longer changes the recipe: accumulation shrinks as ranks are
added and the global batch, the peak learning rate and the number of epochs stay put.

A world size that cannot reach the global batch exactly (``global_batch`` not a multiple
of ``micro_batch x world_size``) is refused with one line, unless
``train.allow_batch_change`` is set: then the nearest reachable global batch is used, the
peak learning rate follows the linear scaling rule (``base_lr x global_batch / 256``) and
the change is printed. ``train.steps > 0`` overrides the epochs (short and test runs).

Every run prints the plan and saves it as ``run_plan.json`` in its run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitssl.train.config import ConfigError, OptimSection, RunConfig
from vitssl.train.schedules import cosine_between, warmup_cosine


@dataclass(frozen=True)
class RunPlan:
    """What a run will do at this world size; every value derived from the config."""

    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    requested_global_batch: int
    """``train.global_batch`` as written (0: none given, micro x accum x world used)."""
    base_lr: float
    peak_lr: float
    min_lr: float
    samples_per_epoch: int
    steps_per_epoch: int
    epochs: float
    """Passes over the data the run makes (from ``train.steps`` when that overrides)."""
    steps: int
    warmup_steps: int
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    wd_schedule: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Changes the plan made to the recipe (printed), e.g. a different global batch."""

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.steps, self.peak_lr, self.warmup_steps, self.min_lr)

    def wd_at(self, step: int) -> float:
        return weight_decay_at(
            self.wd_schedule, self.weight_decay, self.weight_decay_end, step, self.steps
        )

    def summary(self) -> dict[str, Any]:
        """The start-up summary: the plan plus the schedules' first and last values."""
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        last = self.steps - 1
        out["schedules"] = {
            "lr": [self.lr_at(0), self.lr_at(last)],
            "weight_decay": [self.wd_at(0), self.wd_at(last)],
        }
        return out

    def describe(self) -> str:
        s = self.summary()["schedules"]
        lines = [
            f"run plan: world size {self.world_size}, micro batch {self.micro_batch}, "
            f"accumulation {self.grad_accum}, global batch {self.global_batch}",
            f"  peak lr {self.peak_lr:.4g} (base {self.base_lr:.4g} x {self.global_batch}/256), "
            f"{self.epochs:.4g} epochs = {self.steps} steps of {self.samples_per_epoch} samples "
            f"per epoch ({self.steps_per_epoch} steps/epoch), warm-up {self.warmup_steps} steps",
            f"  lr {s['lr'][0]:.4g} -> {s['lr'][1]:.4g}, weight decay "
            f"{s['weight_decay'][0]:.4g} -> {s['weight_decay'][1]:.4g} ({self.wd_schedule})",
        ]
        return "\n".join(lines + [f"  NOTE: {n}" for n in self.notes])


def weight_decay_at(schedule: str, start: float, end: float, step: int, total: int) -> float:
    """``constant``: ``start``; ``cosine``: DINO's ``cosine_scheduler(wd, wd_end, epochs, it)``
    without warm-up, i.e. ``end + (start - end) * (1 + cos(pi * step / total)) / 2``."""
    if schedule == "constant":
        return start
    return cosine_between(start, end, step / max(1, total))


def _accumulation(cfg: RunConfig, world_size: int) -> tuple[int, int, list[str]]:
    """(grad_accum, global batch, notes) reaching ``train.global_batch`` at this world size."""
    t = cfg.train
    per_pass = t.micro_batch * world_size
    if not t.global_batch:
        return t.grad_accum, per_pass * t.grad_accum, []
    accum, rest = divmod(t.global_batch, per_pass)
    if rest == 0 and accum >= 1:
        return accum, t.global_batch, []
    if not t.allow_batch_change:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not reachable with micro batch "
            f"{t.micro_batch} x {world_size} ranks (a multiple of {per_pass} is needed); "
            "change train.micro_batch or set train.allow_batch_change=true"
        )
    accum = max(1, round(t.global_batch / per_pass))
    got = accum * per_pass
    note = (
        f"global batch {got} instead of {t.global_batch} (world size {world_size}): "
        f"peak lr scaled by {got}/{t.global_batch} (linear scaling rule)"
    )
    return accum, got, [note]


def resolve_run_plan(cfg: RunConfig, world_size: int, samples_per_epoch: int) -> RunPlan:
    """Steps, accumulation, warm-up and lr of ``cfg`` on ``world_size`` ranks (pure)."""
    if world_size < 1 or samples_per_epoch < 1:
        raise ValueError("world_size and samples_per_epoch must be >= 1")
    accum, batch, notes = _accumulation(cfg, world_size)
    steps_per_epoch = max(1, samples_per_epoch // batch)
    t, o = cfg.train, cfg.optim
    if t.steps > 0:
        steps = t.steps
        epochs = steps * batch / samples_per_epoch
        if t.epochs > 0:
            notes.append(f"train.steps={steps} overrides train.epochs={t.epochs:g}")
    else:
        steps = max(1, math.ceil(t.epochs * samples_per_epoch / batch))
        epochs = t.epochs
    if o.warmup_epochs > 0:
        warmup = round(o.warmup_epochs * samples_per_epoch / batch)
    else:
        warmup = o.warmup_steps
    return RunPlan(
        world_size=world_size,
        micro_batch=t.micro_batch,
        grad_accum=accum,
        global_batch=batch,
        requested_global_batch=t.global_batch,
        base_lr=o.base_lr,
        peak_lr=o.peak_lr(batch),
        min_lr=o.min_lr,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        steps=steps,
        warmup_steps=warmup,
        warmup_epochs=warmup * batch / samples_per_epoch,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end if o.wd_schedule == "cosine" else o.weight_decay,
        wd_schedule=o.wd_schedule,
        notes=tuple(notes),
    )


def apply_run_plan(cfg: RunConfig, plan: RunPlan) -> RunConfig:
    """``cfg`` with the plan's steps, accumulation and warm-up written in (a new object)."""
    train = dataclasses.replace(cfg.train, steps=plan.steps, grad_accum=plan.grad_accum)
    optim = dataclasses.replace(cfg.optim, warmup_steps=plan.warmup_steps, warmup_epochs=0.0)
    return dataclasses.replace(cfg, train=train, optim=optim)


def samples_per_epoch(cfg: RunConfig) -> int:
    """Samples in one pass over ``data.train_shards`` (from the shard index)."""
    from vitssl.data_pipelines.shard_index import expand_shards, read_index

    return read_index(expand_shards(cfg.data.train_shards), cfg.data.index or None).num_samples


def plan_run(cfg: RunConfig, world_size: int, rank: int) -> RunConfig:
    """Resolve, print and save (``<output_dir>/run_plan.json``) the plan; the resolved config."""
    plan = resolve_run_plan(cfg, world_size, samples_per_epoch(cfg))
    if rank == 0:
        run_dir = Path(cfg.train.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_plan.json").write_text(json.dumps(plan.summary(), indent=2) + "\n")
        print(plan.describe(), flush=True)
    return apply_run_plan(cfg, plan)


def set_weight_decay(
    groups: list[dict[str, Any]], optim: OptimSection, step: int, total: int
) -> None:
    """Scheduled weight decay on the groups that decay (their ``weight_decay`` at build time
    is kept as ``base_weight_decay``; groups built without decay stay at 0)."""
    if optim.wd_schedule == "constant":
        return
    wd = weight_decay_at(optim.wd_schedule, optim.weight_decay, optim.weight_decay_end, step, total)
    for g in groups:
        base = g.setdefault("base_weight_decay", g["weight_decay"])
        g["weight_decay"] = wd * base / optim.weight_decay if base else 0.0
