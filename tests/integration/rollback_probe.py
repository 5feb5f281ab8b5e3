"""``python -m tests.integration.rollback_probe SPEC.json``: NaN rollback runs, one start-up.

Registers a test-only method, ``mae_nan``: MAE whose loss (and so every gradient) is
multiplied by NaN on rank 0 at optimizer step ``method.nan_step``, once
(``method.nan_once``, a batch that goes bad) or every time that step runs (a model that
diverges), and that can be preempted (SIGTERM) at step ``method.term_step``. It exists
only in this module; production code has no NaN switch.

Each rank reads a list of ``{"recipe", "overrides", "skip_at"}`` and trains each in turn
in one process group. ``skip_at`` pre-sets steps whose batch the trainer skips, which is
how the reference run (uninterrupted, that batch skipped) is made. Prints
``RUN <i> EXIT <code>`` per run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from vitssl.models.methods.base import Batch, StepContext
from vitssl.models.methods.mae import MAE, MAEConfig, build_mae
from vitssl.models.registry import register_method
from vitssl.train.config import load_config
from vitssl.train.trainer import Trainer


@dataclass
class NaNMAEConfig(MAEConfig):
    nan_step: int = 0
    """The optimizer step (1-based) whose loss is NaN on rank 0; 0: never."""
    nan_once: bool = True
    """Only the first time that step runs (a rollback's retry is clean)."""
    term_step: int = 0
    """Every rank sends itself SIGTERM as this step starts (a preemption); 0: never."""


class NaNMAE(MAE):
    nan_cfg: NaNMAEConfig
    poison: bool
    fired: int

    def before_step(self, ctx: StepContext) -> None:
        super().before_step(ctx)
        hit = ctx.step + 1 == self.nan_cfg.nan_step and dist.get_rank() == 0
        self.poison = hit and not (self.nan_cfg.nan_once and self.fired)
        self.fired += int(self.poison)
        if ctx.step + 1 == self.nan_cfg.term_step:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's StopFlag catches it

    def forward(self, batch: Batch) -> dict[str, Any]:
        out = super().forward(batch)
        if self.poison:
            out["loss"] = out["loss"] * float("nan")
        return out


@register_method("mae_nan", NaNMAEConfig)
def build_nan_mae(cfg: NaNMAEConfig, model_cfg: Any) -> NaNMAE:
    """``mae`` built as usual (same weights, same random draws), then given this class."""
    method = build_mae(cfg, model_cfg)
    method.__class__ = NaNMAE
    assert isinstance(method, NaNMAE)
    method.nan_cfg, method.poison, method.fired = cfg, False, 0
    return method


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    worst = 0
    for i, item in enumerate(spec):
        trainer = Trainer(load_config(item["recipe"], item["overrides"]))
        trainer.state.skip_at.update(item.get("skip_at", []))
        code = trainer.fit()
        print(f"RUN {i} EXIT {code}", flush=True)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main())
