"""Checkpoints that carry everything needed to continue, written so a crash never breaks one.

Layout of ``<run>/checkpoints/step_00000100/``:

* DeepSpeed's own files (model, optimizer and ZeRO partitions), from ``save_checkpoint``;
* ``rng_rank00000.pt`` .. one per rank: torch / CUDA / Python / NumPy generator states
  (DeepSpeed saves none), read back with ``torch.load(weights_only=True)``;
* ``extra_state.safetensors``: method state outside the optimizer (EMA teachers, centers,
  queues) from ``Method.extra_state()``, when the method has any;
* ``meta.json``: step, data position, samples seen, world size, config and code version;
* ``COMPLETE``: written last, after every rank finished. Only marked checkpoints are resumed
  from or counted; the last ``keep`` marked ones are kept.

Elastic resume: a checkpoint saved at world size N is resumed at world size M != N through
DeepSpeed's universal checkpoint. Rank 0 converts it once (``ds_to_universal``, into
``<checkpoint>/universal/``), and the engine is built with ``checkpoint.load_universal``.
Per-rank RNG states are then not restored: every step reseeds from (seed, step, rank).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Marked checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_complete(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def code_version() -> str:
    """``git describe`` of the project when it is a checkout, else ``unknown``."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def save_checkpoint(
    engine: Any,
    root: Path,
    step: int,
    meta: dict[str, Any],
    keep: int,
    rank: int,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    path = root / tag_for(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists() and not (path / MARKER).exists():
            shutil.rmtree(path)  # a save that crashed half-way at this very step
    _barrier()
    engine.save_checkpoint(str(root), tag=path.name, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank:05d}.pt")
    method = engine.module
    if rank == 0:
        extra = method.extra_state()
        if extra:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in extra.items()},
                str(path / "extra_state.safetensors"),
            )
    _barrier()
    if rank == 0:
        full = dict(meta, step=step, code_version=code_version())
        _write_atomic(path / "meta.json", json.dumps(full, indent=2) + "\n")
        _write_atomic(path / MARKER, f"{step}\n")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


UNIVERSAL = "universal"


def needs_universal(path: Path, world_size: int) -> bool:
    """True when the checkpoint was saved at another world size (elastic resume)."""
    return int(read_meta(path)["world_size"]) != world_size


def ensure_universal(path: Path, rank: int) -> None:
    """Collective: rank 0 converts ``path`` to a universal checkpoint once; others wait."""
    target = path / UNIVERSAL
    if rank == 0 and not (target / MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(path),
            "--output_folder",
            str(target),
            "--inject_missing_state",
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise ValueError(f"could not convert {path} to a universal checkpoint: {tail}")
        _write_atomic(target / MARKER, "universal\n")
    _barrier()


def load_checkpoint(engine: Any, path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Collective: restore model, optimizer, method extra state and this rank's RNG."""
    if not (path / MARKER).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {MARKER} marker)")
    meta = read_meta(path)
    if meta["world_size"] != world_size:
        load_dir, tag = path, UNIVERSAL  # built with checkpoint.load_universal
    else:
        load_dir, tag = path.parent, path.name
    load_path, _ = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {path}")
    extra_file = path / "extra_state.safetensors"
    method = engine.module
    if extra_file.is_file():
        method.load_extra_state(load_file(str(extra_file)))
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if meta.get("world_size") == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta
