"""Launch a stage with submitit, with the sbatch templates' preemption and requeue behaviour.

``python -m vitssl.slurm.submit --launcher submitit --template pretrain_single_node ...
-- RECIPE ...``

submitit submits one job whose tasks (one per GPU) each run :class:`TrainingTask`. A task
runs the stage as a child process (``python -m vitssl.train.pretrain RECIPE ...``), which finds its
rank from the srun step's variables as under the templates. Signals, as in slurm/common.sh:

- near the time limit Slurm sends submitit's signal (USR2, ``--signal=USR2@T``): the task
  sends SIGUSR1 to the stage, which checkpoints at the next step and exits 75 (the ranks
  agree on stopping); then submitit's own requeue runs (on rank 0: it pickles the task
  returned by :meth:`TrainingTask.checkpoint` and calls ``scontrol requeue``), and the
  requeued job runs the same task, which resumes from the run directory;
- SIGUSR1 to the job (``scancel --signal=USR1``) does the same;
- a stage that stops with 75 by itself (``train.stop_at``) is requeued the same way;
- SIGTERM (``scancel``, preemption) is passed on: the stage checkpoints and exits 75, and
  the job is not requeued (Slurm requeues preempted jobs itself when configured to).

The children ignore USR2: Slurm signals every process of the step, and USR2 would kill them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import submitit

EXIT_REQUEUE = 75
"""train.preemption.EXIT_REQUEUE, repeated as slurm/common.sh does: slurm/ imports no trainer
code (the job may run in another checkout, found through --chdir)."""

MODULES = {
    "pretrain_single_node": "vitssl.train.pretrain",
    "pretrain_multi_node": "vitssl.train.pretrain",
    "distil": "vitssl.train.distil",
    "export": "vitssl.train.edge_export",
}
"""The stage each sbatch template runs (eval_array's sweeps stay with sbatch)."""


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainingTask(submitit.helpers.Checkpointable):
    """One submitit task: runs ``python -m MODULE ARGS`` and maps signals onto it."""

    def __init__(self, module: str, args: list[str], chdir: str) -> None:
        self.module = module
        self.args = list(args)
        self.chdir = chdir
        self._child: subprocess.Popen | None = None
        self._terminated = False

    def __getstate__(self) -> dict[str, Any]:  # pickled for the requeue: no live process
        return {"module": self.module, "args": self.args, "chdir": self.chdir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["module"], state["args"], state["chdir"])  # type: ignore[misc]

    def __call__(self) -> int:
        submitit_requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint + requeue
        signal.signal(signal.SIGUSR2, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_term)
        cmd = [sys.executable, "-m", self.module, *self.args]
        print(f"[submitit] running {' '.join(cmd)}", flush=True)
        self._child = subprocess.Popen(cmd, cwd=self.chdir, preexec_fn=_ignore_usr2)
        rc = self._child.wait()
        print(f"[submitit] {self.module} exited with {rc}", flush=True)
        if rc == EXIT_REQUEUE and not self._terminated and callable(submitit_requeue):
            print("[submitit] stopped at a checkpoint (exit 75): requeueing", flush=True)
            submitit_requeue(signal.SIGUSR2, None)  # rank 0: checkpoint(), requeue, exit
        if rc not in (0, EXIT_REQUEUE):
            raise RuntimeError(f"{self.module} failed with exit code {rc}")
        return rc

    def _signal_child(self, signum: int) -> None:
        # os.kill, not Popen.send_signal: this runs in a handler while wait() holds Popen's lock
        if self._child is not None and self._child.returncode is None:
            os.kill(self._child.pid, signum)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        """Time limit (submitit's USR2) or USR1: the stage checkpoints and exits 75, then
        ``__call__`` hands over to submitit's requeue."""
        self._signal_child(signal.SIGUSR1)

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._terminated = True
        self._signal_child(signal.SIGTERM)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's requeue on rank 0, once the stage has stopped at a
        checkpoint: the requeued job runs this same task, which resumes the run."""
        return submitit.helpers.DelayedSubmission(TrainingTask(self.module, self.args, self.chdir))


def submit(
    template: str,
    script_args: list[str],
    options: dict[str, Any],
    log_dir: Path,
    chdir: Path,
) -> str:
    """Submit ``script_args`` (recipe and overrides) with submitit; returns the job id.

    ``options``: nodes, tasks_per_node, gpus_per_node, cpus_per_task, timeout_min, and
    slurm_* settings (partition, account, qos, mem, job_name, signal_delay_s).
    """
    if template not in MODULES:
        raise ValueError(
            f"--launcher submitit runs the templates {', '.join(MODULES)}, not {template!r}"
        )
    executor = submitit.AutoExecutor(folder=str(log_dir / "submitit" / "%j"), cluster="slurm")
    executor.update_parameters(
        **options,
        slurm_additional_parameters={"requeue": True, "open-mode": "append", "chdir": str(chdir)},
    )
    job = executor.submit(TrainingTask(MODULES[template], script_args, str(chdir)))
    return str(job.job_id)
