"""What a run measures and writes: step scalars kept on the device, and rank-0 logging
(TensorBoard scalars and images, a JSONL file, a progress bar).

Host syncs: a step's scalar outputs are summed on the device (:class:`StepMetrics`) and the
first non-finite step is a device flag; both reach the host only when the trainer asks, on
logging and checkpoint steps. Between those steps nothing in here reads a tensor's value.

Optionally also Weights & Biases (``log.wandb=true``; offline with ``WANDB_MODE=offline``).
"""

from __future__ import annotations

import json
import math
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

NO_BAD_STEP = 2**62
"""Stand-in for "no bad step" in the flag's all-reduce (MIN over ranks)."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StepMetrics:
    """The scalar outputs of the current step and a non-finite flag, all on the device.

    ``add`` sums every scalar a micro-step returns (divided by the accumulation, in float64,
    as the host sum did before); ``end_step`` folds "this step's loss or gradient norm is
    not finite" into ``bad``: the first such step since the last :meth:`reset`, 0 if none.
    All of that is asynchronous device work. :meth:`first_bad_step` and
    :meth:`mean_over_ranks` are the two reads, collective, called on logging and
    checkpoint steps only. Why a first-step flag rather than a per-step check: the rollback
    needs to know which batch to skip, and the flag keeps that without reading anything.
    """

    def __init__(self, device: torch.device, check_grad_norm: bool) -> None:
        self.device = device
        self.check_grad_norm = check_grad_norm
        self.parts: dict[str, torch.Tensor] = {}
        self.bad = torch.zeros((), dtype=torch.int64, device=device)

    def start_step(self) -> None:
        self.parts = {}

    def add(self, out: dict[str, Any], accum: int) -> None:
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                part = value.detach().double() / accum
                self.parts[key] = self.parts[key] + part if key in self.parts else part

    def end_step(self, step: int, grad_norm: Any) -> None:
        """``grad_norm``: DeepSpeed's cached global norm (a device tensor, a float or None).
        Under fp16 it is not checked: an overflow there is the loss scaler's business."""
        finite = torch.isfinite(self.parts["loss"])
        if self.check_grad_norm and isinstance(grad_norm, torch.Tensor):
            finite = finite & torch.isfinite(grad_norm).all()
        elif self.check_grad_norm and grad_norm is not None and not math.isfinite(grad_norm):
            finite = torch.zeros_like(finite)
        fresh = (self.bad == 0) & ~finite
        self.bad = torch.where(fresh, torch.full_like(self.bad, step), self.bad)

    def first_bad_step(self) -> int:
        """Collective: the first non-finite step on any rank since the last reset, or 0."""
        flag = torch.where(self.bad == 0, torch.full_like(self.bad, NO_BAD_STEP), self.bad)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        first = int(flag.item())
        return 0 if first == NO_BAD_STEP else first

    def reset(self) -> None:
        self.parts = {}
        self.bad = torch.zeros((), dtype=torch.int64, device=self.device)

    def mean_over_ranks(self, host: dict[str, float]) -> dict[str, float]:
        """Collective: this step's parts and the ``host`` values, averaged over ranks."""
        keys = sorted(self.parts)
        extra = sorted(host)
        values = [self.parts[k] for k in keys]
        values += [torch.tensor(host[k], dtype=torch.float64, device=self.device) for k in extra]
        t = torch.stack(values)
        if dist.is_initialized():
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return dict(zip(keys + extra, t.tolist(), strict=True))


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the rows of ``path`` logged after ``last_step`` (and a half-written last line).

    A run resumed from the checkpoint of step N replays the steps after N; without this,
    ``metrics.jsonl`` would hold their rows twice (TensorBoard's ``purge_step`` does the
    same for its event files). Written to a temporary file and renamed into place.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # cut off by a kill: nothing to keep
            continue
        if int(row.get("step", 0)) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class WandbSink:
    """One W&B run per run directory: its id is kept in ``wandb_id.txt`` so that a resumed or
    requeued job continues the same W&B run (``resume="allow"``) instead of starting another.
    The mode (online, offline, disabled) comes from W&B's own ``WANDB_MODE``."""

    ID_FILE = "wandb_id.txt"

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError("log.wandb=true needs wandb: pip install 'vitssl[wandb]'") from None
        self.wandb = wandb
        id_file = run_dir / self.ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            name=run_dir.name,
            config=config,
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def image(self, step: int, tag: str, img: torch.Tensor) -> None:
        pixels = img.float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
        self.run.log({tag: self.wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLogger:
    """Writes only on rank 0; every other rank gets a logger that does nothing.

    ``wandb_project``: also log to W&B under this project (None: no W&B); ``config`` is the
    run configuration W&B shows beside the curves."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        total_steps: int,
        start_step: int,
        progress: bool,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.tb: Any = None
        self.jsonl: Any = None
        self.bar: Any = None
        self.wandb: WandbSink | None = None
        if not self.enabled:
            return
        if wandb_project is not None:
            self.wandb = WandbSink(run_dir, wandb_project, config)
        self._open(start_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )

    def _open(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        truncate_jsonl(self.run_dir / "metrics.jsonl", start_step)
        self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=start_step + 1)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def rewind(self, step: int) -> None:
        """Forget everything logged after ``step`` (a rollback to that step's checkpoint)."""
        if not self.enabled:
            return
        self.tb.close()
        self.jsonl.close()
        self._open(step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        row = {"step": step, "time": round(time.time(), 3)}
        row.update(
            {k.split("/")[-1] if k.startswith("loss_metrics/") else k: v for k, v in values.items()}
        )
        self.jsonl.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.scalars(step, values)

    def event(self, step: int, **fields: Any) -> None:
        """A non-metric line in the JSONL (resume, preemption, rollback, warnings)."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, "event": fields}) + "\n")

    def image(self, step: int, tag: str, img: torch.Tensor) -> None:
        if self.enabled:
            self.tb.add_image(tag, img.float().cpu(), step)
            if self.wandb is not None:
                self.wandb.image(step, tag, img)

    def progress(self, n: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix is not None:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.flush()
        self.tb.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.close()
