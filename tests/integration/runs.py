"""Helpers for multi-process runs: tiny overrides and a torchrun launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "model.patch_size=8",
    "method.decoder_dim=32",
    "method.decoder_depth=1",
    "method.decoder_heads=2",
    "train.micro_batch=8",
    "data.num_workers=0",
    "log.every=1",
    "log.image_every=0",
    "log.progress=false",
    "optim.warmup_steps=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shard_overrides(root: Path) -> list[str]:
    names = sorted(p.name for p in (root / "train").glob("*.tar"))
    spec = ",".join(str(root / "train" / n) for n in names)
    return [f"data.train_shards={json.dumps(spec)}", f"data.index={root / 'train' / 'index.json'}"]


def launch(
    nproc: int, args: list[str], timeout: float = 300, nnodes: int = 1
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m vitssl.train.pretrain ARGS`` on the CPU (gloo).

    With ``nnodes > 1``, one torchrun per simulated node over loopback (``--nnodes``,
    ``--node_rank``, static rendezvous at 127.0.0.1), as on a real multi-node job.
    Returns node 0's result with every node's output.
    """
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in range(nnodes):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--node_rank={node}",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "vitssl.train.pretrain",
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=timeout) for p in procs]
    codes = [p.returncode for p in procs]
    code = codes[0] if len(set(codes)) == 1 else -999
    return subprocess.CompletedProcess(
        procs[0].args, code, "".join(o for o, _ in outs), "".join(e for _, e in outs)
    )


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@dataclass
class Rank:
    """One started rank and the files its output goes to."""

    proc: subprocess.Popen
    out: IO[str]
    err: IO[str]

    def read(self) -> tuple[str, str]:
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return texts[0], texts[1]


def start(nproc: int, args: list[str], module: str = "vitssl.train.pretrain") -> list[Rank]:
    """N processes of ``python -m MODULE ARGS`` with rank variables, as srun starts them.

    Output goes to files, not pipes: a rank blocked on a full pipe would hang its peers.
    """
    port = str(free_port())
    ranks = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        out = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed by Rank.read)
        err = tempfile.TemporaryFile("w+")  # noqa: SIM115
        cmd = [sys.executable, "-m", module, *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        ranks.append(Rank(proc, out, err))
    return ranks


def finish(ranks: list[Rank], timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for every rank; rank 0's exit code (-999 when ranks disagree), all output.

    Unlike torchrun, which turns any non-zero exit into 1, this keeps the exit code (75
    after a signal-triggered checkpoint).
    """
    codes = [r.proc.wait(timeout=timeout) for r in ranks]
    texts = [r.read() for r in ranks]
    out = "".join(o for o, _ in texts)
    err = "".join(e for _, e in texts)
    if len(set(codes)) != 1:
        err += f"\nranks exited with different codes: {codes}"
    code = codes[0] if len(set(codes)) == 1 else -999
    return subprocess.CompletedProcess(ranks[0].proc.args, code, out, err)


def spawn(
    nproc: int, args: list[str], timeout: float = 300, module: str = "vitssl.train.pretrain"
) -> subprocess.CompletedProcess:
    """``start`` + ``finish``: one multi-process run of ``python -m MODULE ARGS``."""
    return finish(start(nproc, args, module), timeout)
