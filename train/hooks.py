"""Periodic actions of the trainer, each a small hook with its interval.

A hook says whether it is due after a step (``due``) and acts (``__call__``). The trainer
runs the due hooks in order after checking that no step since the last check went
non-finite, so none of them ever logs, evaluates or saves a poisoned model. Hooks are the
only places that move values to the host: the steps between them run without a sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitssl.train.engine import gathered_direct_params
from vitssl.train.metrics import peak_memory_mb

if TYPE_CHECKING:
    from vitssl.train.trainer import StepResult, Trainer


@dataclass
class Window:
    """Wall time and data wait since the last logged step, hooks' own time left out."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    wait: float = 0.0

    def restart(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0


class Hook:
    """Runs every ``every`` steps (0: never); ``at_end`` also runs it after the last step."""

    every: int = 0
    at_end: bool = False

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every and step % self.every == 0) or (self.at_end and last)

    def __call__(self, trainer: Trainer, result: StepResult) -> None:  # pragma: no cover
        raise NotImplementedError


class LogScalars(Hook):
    """Loss, metrics, learning rate, throughput, data wait, memory and gradient norm."""

    at_end = True

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        mean = trainer.metrics.mean_over_ranks({"skipped": float(trainer.batches.skipped)})
        window = trainer.window
        elapsed = max(time.perf_counter() - window.start, 1e-9)  # after the sync above
        step = trainer.state.step
        values = {f"loss_metrics/{k}": v for k, v in mean.items() if k not in ("loss", "skipped")}
        values.update(
            {
                "loss": mean["loss"],
                "lr": result.lr,
                "throughput/images_per_s": window.steps * trainer.plan.global_batch / elapsed,
                "samples_seen": float(trainer.state.samples_seen),
                "time_metrics/data_loading(%)": 100.0 * window.wait / elapsed,
                "memory/peak_mb": peak_memory_mb(trainer.device),
                "data/skipped_samples": mean["skipped"] * trainer.world,
            }
        )
        grad_norm = trainer.engine.get_global_grad_norm()
        if grad_norm is not None:  # DeepSpeed's global norm; absent with ZeRO-0 in fp32 unclipped
            values["grad_norm"] = float(grad_norm)
        trainer.logger.scalars(step, values)
        trainer.logger.progress(0, {"loss": mean["loss"], "lr": result.lr})


class OnlineKNNHook(Hook):
    """k-NN top-1 of the backbone on the validation shards (collective)."""

    def __init__(self, every: int, knn: Any) -> None:
        self.every = every if knn.enabled else 0
        self.knn = knn

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        method = trainer.method
        with gathered_direct_params(method, trainer.built.zero3):
            knn = self.knn(trainer.state.step, method.backbone, trainer.device, trainer.built.dtype)
        if knn is not None:
            trainer.logger.scalars(trainer.state.step, knn)


class CollapseMonitor(Hook):
    """Collapse monitors on the method's two-view embeddings, when it returns them."""

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        from vitssl.models.collapse import collapse_metrics, collapse_warning

        embeddings = result.out.get("embeddings")
        if embeddings is None:
            return
        step, logger = trainer.state.step, trainer.logger
        z1, z2 = (z.detach().float() for z in embeddings)
        metrics = collapse_metrics(z1, z2)
        logger.scalars(step, {f"collapse/{k}": v for k, v in metrics.items()})
        warning = collapse_warning(metrics)
        if warning:
            logger.event(step, collapse=warning)
            logger.write(f"WARNING step {step}: representation collapse suspected: {warning}")


class Pictures(Hook):
    """The method's picture of the last micro-batch (MAE reconstructions) to TensorBoard."""

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        with gathered_direct_params(trainer.method, trainer.built.zero3):
            img = trainer.method.visualize(result.batch)
        if img is not None:
            trainer.logger.image(trainer.state.step, "images/method", img)


class Checkpoint(Hook):
    """A complete checkpoint every ``every`` steps and after the last one."""

    at_end = True

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, trainer: Trainer, result: StepResult) -> None:
        trainer.save()
