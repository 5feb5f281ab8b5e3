"""Rank-0 logging: TensorBoard scalars and images, a JSONL file, a progress bar, and
optionally Weights & Biases (``log.wandb=true``; offline with ``WANDB_MODE=offline``)."""

from __future__ import annotations

import json
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
        self.tb: Any = None
        self.jsonl: Any = None
        self.bar: Any = None
        self.wandb: WandbSink | None = None
        if not self.enabled:
            return
        if wandb_project is not None:
            self.wandb = WandbSink(run_dir, wandb_project, config)
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if progress:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )

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
        """A non-metric line in the JSONL (resume, preemption, warnings)."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, "event": fields}) + "\n")

    def image(self, step: int, tag: str, img: torch.Tensor) -> None:
        if self.enabled:
            self.tb.add_image(tag, img.float().cpu(), step)
            if self.wandb is not None:
                self.wandb.image(step, tag, img)

    def progress(self, n: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(n)
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
