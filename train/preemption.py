"""SIGTERM / SIGUSR1 -> checkpoint at the next step boundary -> exit with EXIT_REQUEUE.

Slurm sends SIGUSR1 ahead of a time limit (``--signal=USR1@120``) and SIGTERM on
preemption. The handler only sets a flag; the trainer checks it between steps, agrees on
it across ranks (any rank signalled stops them all), saves and exits with
:data:`EXIT_REQUEUE`, which the sbatch templates turn into ``scontrol requeue``.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75
"""Exit code after a signal-triggered checkpoint (sysexits' EX_TEMPFAIL: try again)."""


class StopFlag:
    """Set by SIGTERM/SIGUSR1; ``should_stop()`` is collective when a process group exists."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def should_stop(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.signum else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
