"""Where this process sits in the job: rank, world size and rendezvous address.

Three launchers are understood, in this order of precedence:

* ``torchrun`` (or anything that sets ``RANK`` and ``WORLD_SIZE``): its variables are used
  as they are.
* ``srun`` with one task per GPU: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NODEID`` and the step's node list give the ranks; the rendezvous host is the
  first node of the step and the port follows from ``SLURM_JOB_ID``, so that two jobs
  sharing a node do not collide. ``MASTER_ADDR`` / ``MASTER_PORT``, when set, win.
* nothing: a single process on ``127.0.0.1``.

:func:`apply_dist_env` writes the result into ``os.environ`` in torchrun's names, which is
what ``torch.distributed.init_process_group(init_method="env://")`` and DeepSpeed read.
This module only reads variables; it never calls a Slurm command.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 29500
PORT_BASE = 15000
"""Ports derived from a job id lie in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's
ephemeral range (32768+), so a derived port is not already taken by an outgoing socket."""
PORT_SPAN = 15000


@dataclass(frozen=True)
class DistEnv:
    """One process's place in a (possibly single-process) distributed run."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the run."""
    local_rank: int
    """Rank on this node; picks the GPU."""
    local_world_size: int
    """Processes on this node."""
    node_rank: int
    """Index of this node in the run."""
    master_addr: str
    """Host of rank 0, where the rendezvous store listens."""
    master_port: int
    """Port of the rendezvous store."""
    source: str
    """Which launcher the values came from: ``torchrun``, ``slurm`` or ``default``."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} is not in a node of {self.local_world_size}"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} is not a TCP port")


def resolve_dist_env(environ: Mapping[str, str]) -> DistEnv:
    """Work out the process's :class:`DistEnv` from environment variables (see module doc)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if "SLURM_PROCID" in environ and _in_srun_step(environ):
        return _from_slurm(environ)
    ntasks = environ.get("SLURM_NTASKS", "1")
    if ntasks.isdigit() and int(ntasks) > 1:
        warnings.warn(
            f"this Slurm job has {ntasks} tasks but the process was not started by srun; "
            "running a single process (launch with srun, one task per GPU, to use them all)",
            stacklevel=2,
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        node_rank=0,
        master_addr=environ.get("MASTER_ADDR", DEFAULT_ADDR),
        master_port=_int(environ, "MASTER_PORT", DEFAULT_PORT),
        source="default",
    )


def apply_dist_env(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write ``env`` into ``environ`` (default ``os.environ``) under torchrun's names."""
    target = os.environ if environ is None else environ
    target["RANK"] = str(env.rank)
    target["WORLD_SIZE"] = str(env.world_size)
    target["LOCAL_RANK"] = str(env.local_rank)
    target["LOCAL_WORLD_SIZE"] = str(env.local_world_size)
    target["GROUP_RANK"] = str(env.node_rank)
    target["MASTER_ADDR"] = env.master_addr
    target["MASTER_PORT"] = str(env.master_port)


def port_from_job_id(job_id: int) -> int:
    """A rendezvous port that differs between jobs (and is the same for every task of one)."""
    return PORT_BASE + job_id % PORT_SPAN


# ---------------------------------------------------------------------- launchers


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "RANK")
    world_size = _int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK", 0)
    local_world_size = _int(environ, "LOCAL_WORLD_SIZE", world_size)
    node_rank = _int(environ, "GROUP_RANK", rank // max(local_world_size, 1))
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        node_rank=node_rank,
        master_addr=environ.get("MASTER_ADDR", DEFAULT_ADDR),
        master_port=_int(environ, "MASTER_PORT", DEFAULT_PORT),
        source="torchrun",
    )


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    """True inside an ``srun`` step; the batch shell of ``sbatch`` has no step id."""
    return "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "SLURM_PROCID")
    world_size = _int(environ, "SLURM_NTASKS", 0) or _int(environ, "SLURM_STEP_NUM_TASKS", 1)
    node_rank = _int(environ, "SLURM_NODEID", 0)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get(
        "SLURM_TASKS_PER_NODE", ""
    )
    counts = parse_tasks_per_node(tasks_per_node) if tasks_per_node else [world_size]
    if node_rank >= len(counts):
        raise ValueError(f"SLURM_NODEID={node_rank} but tasks per node are {tasks_per_node!r}")
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    else:
        hosts = parse_nodelist(nodelist) if nodelist else []
        master_addr = hosts[0] if hosts else DEFAULT_ADDR
    if "MASTER_PORT" in environ:
        master_port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        master_port = port_from_job_id(_int(environ, "SLURM_JOB_ID"))
    else:
        master_port = DEFAULT_PORT
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        local_world_size=counts[node_rank],
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        source="slurm",
    )


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


# ---------------------------------------------------------------------- Slurm lists


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, where: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]`` (zero padding kept)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in node list {where!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list {where!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, where: str) -> list[str]:
    """Expand every ``[...]`` group of one host pattern (``rack[1-2]-n[01-02]``: 4 hosts)."""
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"unbalanced brackets in node list {where!r}")
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [
        host
        for value in _expand_range_list(m.group(1), where)
        for host in _expand_host(head + value + tail, where)
    ]


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5."""
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist):
        hosts.extend(_expand_host(pattern, nodelist))
    return hosts


def parse_tasks_per_node(text: str) -> list[int]:
    """Expand ``SLURM_TASKS_PER_NODE``: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {text!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
