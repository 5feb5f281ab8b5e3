"""SIGTERM / SIGUSR1 -> checkpoint at the next step boundary -> exit with EXIT_REQUEUE.

Slurm sends SIGUSR1 ahead of a time limit (``--signal=USR1@120``) and SIGTERM on
preemption. The handler only sets a flag; the trainer checks it between steps, agrees on
it across ranks (any rank signalled stops them all), saves and exits with
:data:`EXIT_REQUEUE`, which the sbatch templates turn into ``scontrol requeue``.

The flag never touches the accelerator: it is host memory all-reduced through gloo (a
side group of its own when the training group is NCCL), so checking it every step costs
no device sync.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

EXIT_REQUEUE = 75
"""Exit code after a signal-triggered checkpoint (sysexits' EX_TEMPFAIL: try again)."""


class StopFlag:
    """Set by SIGTERM/SIGUSR1; ``should_stop()`` is collective when a process group exists
    (so every rank must build its StopFlag at the same point)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self._group: Any = None
        if dist.is_available() and dist.is_initialized():
            gloo = dist.get_backend() == "gloo"
            self._group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def should_stop(self) -> bool:
        buf = np.array([1 if self.signum else 0], dtype=np.int32)
        if self._group is not None:
            dist.all_reduce(torch.from_numpy(buf), op=dist.ReduceOp.MAX, group=self._group)
        return bool(buf[0])  # host memory: the CPU tensor shares the array's buffer

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
