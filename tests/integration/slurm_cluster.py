"""A private single-node Slurm cluster for the integration tests.

:class:`SlurmCluster` writes a munge key and a ``slurm.conf`` into a temporary directory,
starts ``munged``, ``slurmctld`` and ``slurmd`` from them (this host is the only node,
with as many CPUs as ``nproc`` reports), waits until the node is idle, and stops every
daemon it started. Clients (``sbatch``, ``scontrol``...) find the cluster through
:attr:`SlurmCluster.env` (``SLURM_CONF``); the system's own Slurm config, if any, is
never touched.

Needs root (``SlurmUser=root``) and the ``slurm-wlm`` and ``munge`` packages, which
``.ci/install_slurm.sh`` installs; :func:`missing_binaries` says what is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def missing_binaries() -> list[str]:
    """Slurm and munge programs that are not on PATH (``/usr/sbin`` included)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in DAEMONS + CLIENTS if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(f"{name} not found; run .ci/install_slurm.sh")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def parse_scontrol_record(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of one ``scontrol show <entity>`` record (values without spaces)."""
    return dict(re.findall(r"(\S+?)=(\S*)", text))


@dataclass
class SlurmCluster:
    """munged + slurmctld + slurmd on this host, configured and kept under ``root``."""

    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    node: str = field(default_factory=socket.gethostname)
    partition: str = "debug"
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and the jobs they submit."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin"
        return env

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge()
        self._write_conf()
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait_for_controller(timeout)
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], "slurmd")
        self._wait_for_idle_node(timeout)

    def stop(self) -> None:
        """Cancel what is left, stop the daemons this cluster started (slurmd first)."""
        if self._procs:
            subprocess.run(
                [_which("scancel"), "--full", "--partition", self.partition],
                env=self.env,
                capture_output=True,
                timeout=30,
                check=False,
            )
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, argv: Sequence[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 (lives with proc)
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        self._procs.append(proc)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn(
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
            "munged",
        )
        deadline = time.monotonic() + 20
        while not Path(self.munge_socket).exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start; see {self.root / 'log'}")
            time.sleep(0.1)

    @property
    def munge_socket(self) -> str:
        return str(self.root / "munge" / "munge.socket")

    def _write_conf(self) -> None:
        r = self.root
        lines = [
            "ClusterName=ssltest",
            f"SlurmctldHost={self.node}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it starts again.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "LaunchParameters=use_interactive_step",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={_total_memory_mb()} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _check_alive(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args!r} exited with {proc.returncode}; see {self.root / 'log'}"
                )

    def _wait_for_controller(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            res = self.run(["scontrol", "ping"], check=False)
            if "UP" in res.stdout:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurmctld did not come up: {res.stdout}{res.stderr}")
            time.sleep(0.5)

    def _wait_for_idle_node(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            self._check_alive()
            res = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = res.stdout.strip()
            if state == "idle":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not idle after {timeout}s (state {state!r})")
            time.sleep(0.5)

    # ------------------------------------------------------------------ clients

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``sbatch``, ``scontrol``...) against this cluster."""
        return subprocess.run(
            [_which(argv[0]), *argv[1:]],
            env=self.env | dict(env or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return parse_scontrol_record(res.stdout)

    def wait_for_job(
        self, job_id: int, timeout: float, states: Sequence[str] = TERMINAL_STATES
    ) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; return its record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout}s")
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemons' logs, for assertion messages."""
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(out)
