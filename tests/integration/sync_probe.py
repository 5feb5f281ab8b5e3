"""``python -m tests.integration.sync_probe RECIPE [overrides]``: host syncs per training step.

Runs one training in this process with a ``TorchDispatchMode`` that counts
``aten._local_scalar_dense``, the op that ``.item()``, ``float()``, ``int()`` and
``bool()`` of a tensor dispatch to (a device-to-host read: on a GPU, a stream sync). The
count is attributed to the step whose ``train_step`` or hooks made it, and printed as
``SYNCS {"1": n1, ...}``, followed by ``WHERE step: stack`` lines for each sync so a
failure says who read. The data loader's workers are other processes and not counted.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitssl.train.config import load_config
from vitssl.train.trainer import StepResult, Trainer


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.counts: dict[int, int] = defaultdict(int)
        self.where: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts[self.step] += 1
            frames = traceback.extract_stack()[-7:-1]
            self.where.append(
                f"{self.step}: "
                + " <- ".join(
                    f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames)
                )
            )
        return func(*args, **(kwargs or {}))


class CountingTrainer(Trainer):
    counter: SyncCounter

    def train_step(self) -> StepResult:
        self.counter.step = self.state.step + 1  # syncs from here on belong to this step
        return super().train_step()


def main() -> int:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = CountingTrainer(cfg)
    trainer.counter = SyncCounter()
    with trainer.counter:
        code = trainer.fit()
    counts = {s: trainer.counter.counts.get(s, 0) for s in range(1, cfg.train.steps + 1)}
    print("SYNCS " + json.dumps(counts), flush=True)
    for line in trainer.counter.where:
        print("WHERE " + line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
