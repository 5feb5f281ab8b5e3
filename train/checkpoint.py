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

Loading is weights-only: checkpoints come from other people (teachers, shared runs), and a
pickle can run code. DeepSpeed's own reader (``TorchCheckpointEngine.load``) and its offline
tools (``zero_to_fp32``, ``ds_to_universal``, the universal loader) unpickle in full.
So the engine's reader is replaced by
:class:`WeightsOnlyCheckpointEngine` (``torch.load(weights_only=True)`` with the few
DeepSpeed classes it pickles allow-listed, :func:`deepspeed_safe_globals`). The other
readers pass ``weights_only=False`` to ``torch.load`` themselves, so they run inside
:func:`weights_only_torch_load`, which routes every ``torch.load`` of the process (and of
its forked workers) through :func:`load_weights_only` for their duration; the conversion
subprocess runs under it too. Checking the files first and letting DeepSpeed read them
after would leave a window in which a file could be swapped. :func:`verify_weights_only`
still reads everything up front, for one clear error before any DeepSpeed output.

Faults end in one line (a ``ValueError`` that the entry points print): a checkpoint of
another model or method is refused before DeepSpeed loads it (:func:`check_compatible`,
naming the differing parameters); a save checks the free space against the last
checkpoint's size first, and a save that fails (disk full, read-only) removes its partial
step directory and names the path and the free space.

Elastic resume: a checkpoint saved at world size N is resumed at world size M != N through
DeepSpeed's universal checkpoint. Rank 0 converts it once (``ds_to_universal``, into
``<checkpoint>/universal/``), and the engine is built with ``checkpoint.load_universal``.
Per-rank RNG states are then not restored: every step reseeds from (seed, step, rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

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
    """Collective: every rank calls it. Returns the checkpoint directory.

    A save that cannot fit (:func:`check_free_space`) or fails on any rank (disk full,
    read-only) raises a one-line ``ValueError`` on every rank; rank 0 removes the partial
    step directory, and the earlier complete checkpoints stay.
    """
    path = root / tag_for(step)
    error: str | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if path.exists() and not (path / MARKER).exists():
                shutil.rmtree(path)  # a save that crashed half-way at this very step
            check_free_space(root)
        except OSError as e:
            error = _save_error(root, e)
        except ValueError as e:
            error = str(e)
    error = _agree(error)
    if error is None:
        try:
            _rank_files(engine, root, path, rank)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports ENOSPC as RuntimeError
            error = _save_error(path, e)
    error = _agree(error)
    if error is None and rank == 0:
        try:
            full = dict(meta, step=step, code_version=code_version())
            _write_atomic(path / "meta.json", json.dumps(full, indent=2) + "\n")
            _write_atomic(path / MARKER, f"{step}\n")
        except OSError as e:
            error = _save_error(path, e)
    error = _agree(error)
    if error is not None:
        if rank == 0 and not (path / MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)  # only ever a partial step
        _barrier()
        raise ValueError(error)
    if rank == 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint; a missing or broken one is a one-line ``ValueError``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a checkpoint (no meta.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}/meta.json could not be read: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}/meta.json does not hold an object")
    return meta


UNIVERSAL = "universal"


def needs_universal(path: Path, world_size: int) -> bool:
    """True when the checkpoint was saved at another world size (elastic resume)."""
    return int(read_meta(path)["world_size"]) != world_size


def ensure_universal(path: Path, rank: int) -> None:
    """Collective: rank 0 checks ``path`` weights-only and converts it to a universal
    checkpoint once; others wait. A failure is a ``ValueError`` on every rank."""
    error: str | None = None
    if rank == 0:
        try:
            verify_weights_only(path)  # ds_to_universal and the universal loader unpickle fully
            _convert_universal(path)
        except ValueError as e:
            error = str(e)
    error = _agree(error)
    if error is not None:
        raise ValueError(error)


def _convert_universal(path: Path) -> None:
    target = path / UNIVERSAL
    if (target / MARKER).is_file():
        return
    shutil.rmtree(target, ignore_errors=True)
    args = [
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
    # ds_to_universal, run as its own __main__ with every torch.load weights-only.
    code = (
        "import runpy, sys\n"
        "from vitssl.train.checkpoint import weights_only_torch_load\n"
        "sys.argv = ['ds_to_universal', *sys.argv[1:]]\n"
        "with weights_only_torch_load():\n"
        "    runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__')\n"
    )
    import vitssl

    env = dict(os.environ)
    home = str(Path(vitssl.__file__).parent.parent)  # the checkout, or site-packages
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        last = lines[-1].split("CheckpointFileError: ", 1)[-1]
        raise ValueError(f"could not convert {path} to a universal checkpoint: {last}")
    _write_atomic(target / MARKER, "universal\n")


def load_checkpoint(engine: Any, path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Collective: restore model, optimizer, method extra state and this rank's RNG."""
    if not (path / MARKER).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {MARKER} marker)")
    meta = read_meta(path)
    check_compatible(path, engine.module)
    install_weights_only_engine(engine)
    if meta["world_size"] != world_size:
        load_dir, tag = path, UNIVERSAL  # built with checkpoint.load_universal
    else:
        load_dir, tag = path.parent, path.name
    with weights_only_torch_load():  # the universal loader calls torch.load itself
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


# ---------------------------------------------------------------- weights-only loading


def deepspeed_safe_globals() -> list[Any]:
    """The few classes DeepSpeed pickles beside tensors, allow-listed for weights-only loads.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on the files of
    ZeRO-0/1/2/3 runs in fp32, bf16 and fp16: the ZeRO stage enum and the fp16 loss scalers
    in the optimizer states, the fragment addresses of ZeRO-1/2's parameter slices, and an
    ``argparse.Namespace`` when a launcher passes ``args``. Each is rebuilt from plain values
    (an enum call or an attribute dict) and runs no code of the file's choosing.
    """
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, argparse.Namespace]


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _refusal(err: Exception) -> str:
    """What the weights-only unpickler refused, from its long message."""
    text = str(err)
    found = _REFUSED_GLOBAL.search(text)
    if found:
        return found.group(1)
    after = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.strip() for ln in after.splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


class CheckpointFileError(ValueError):
    """A checkpoint file that is not weights-only, or not a torch file at all.

    Its own class, so that callers which treat a ``ValueError`` from DeepSpeed's readers as
    "nothing to merge" can let this one through.
    """


_TORCH_LOAD = torch.load  # the real loader, also while weights_only_torch_load() is active


def load_weights_only(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's classes allow-listed.

    A file that needs anything else (a pickle that would run code) is refused with a
    one-line ``ValueError`` naming what it wanted to unpickle; nothing of it runs.
    ``mmap``: map tensor storages instead of reading them (zip files only), for checks.
    """
    import zipfile

    mmap = mmap and zipfile.is_zipfile(path)
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise CheckpointFileError(
                f"{path} is not a weights-only checkpoint (refusing to unpickle {_refusal(e)})"
            ) from None
        except (RuntimeError, OSError, EOFError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointFileError(
                f"{path} could not be read as a torch checkpoint: {first}"
            ) from None


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Make every ``torch.load`` in this process weights-only while the block runs.

    For DeepSpeed's readers that call ``torch.load(..., weights_only=False)`` directly
    (``zero_to_fp32``, ``ds_to_universal``, the universal and optimizer-state loaders): a
    path goes through :func:`load_weights_only`, whatever ``weights_only`` they pass, and a
    refused file raises :class:`CheckpointFileError`. Workers forked inside the block inherit
    it. Not thread-safe: use it around single-threaded loading only.
    """

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, os.PathLike)):
            return load_weights_only(Path(f), map_location, bool(kwargs.get("mmap")))
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return _TORCH_LOAD(f, map_location, *args, **kwargs)

    original, torch.load = torch.load, load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original


def verify_weights_only(path: Path) -> None:
    """Load every ``*.pt`` under ``path`` weights-only (memory-mapped), or raise.

    Run before DeepSpeed's offline readers (``zero_to_fp32``, ``ds_to_universal``, the
    universal loader), which unpickle in full: they then only see files
    the weights-only unpickler accepted.
    """
    for f in sorted(path.rglob("*.pt")):
        load_weights_only(f, mmap=True)


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with a weights-only ``load``; everything else (saving,
    commit, decoupled writes) is the engine DeepSpeed built, to which it delegates."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_weights_only(Path(path), map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install_weights_only_engine(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`load_weights_only`."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)


# ---------------------------------------------------------------- resuming into another model


def model_states_file(path: Path) -> Path:
    """DeepSpeed's module file of a checkpoint (``mp_rank_00_model_states.pt``, or
    ``zero_pp_rank_0_mp_rank_00_model_states.pt`` under ZeRO-3)."""
    files = sorted(path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise ValueError(f"{path}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
    return files[0]


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of checkpoint ``path``, read weights-only.

    DeepSpeed's ``param_shapes`` (and ``frozen_param_shapes``) are authoritative under ZeRO-3,
    whose ``module`` holds no partitioned weights; the ``module`` tensors give the rest.
    """
    state = load_weights_only(model_states_file(path), mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ValueError(f"{path}: the model states hold no 'module' state dict")
    shapes = {k: tuple(v.shape) for k, v in state["module"].items() if torch.is_tensor(v)}
    groups = state.get("param_shapes") or []
    for group in [groups] if isinstance(groups, dict) else groups:
        shapes.update({k: tuple(v) for k, v in group.items()})
    shapes.update({k: tuple(v) for k, v in (state.get("frozen_param_shapes") or {}).items()})
    return shapes


def module_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Full shapes of a module's parameters (``ds_shape`` when ZeRO-3 partitioned them) and
    persistent buffers: the names and shapes its state dict has."""
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    for prefix, sub in module.named_modules():
        for n, b in sub.named_buffers(recurse=False):
            if b is not None and n not in sub._non_persistent_buffers_set:
                shapes[f"{prefix}.{n}" if prefix else n] = tuple(b.shape)
    return shapes


def shape_differences(
    saved: dict[str, tuple[int, ...]], here: dict[str, tuple[int, ...]]
) -> list[str]:
    """Human-readable differences, shapes first, then missing and unexpected names."""

    def fmt(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape)) or "scalar"

    out = [
        f"{k} {fmt(saved[k])} there, {fmt(here[k])} here"
        for k in sorted(saved.keys() & here.keys())
        if saved[k] != here[k]
    ]
    out += [f"{k} missing in the checkpoint" for k in sorted(here.keys() - saved.keys())]
    out += [f"{k} not in this model" for k in sorted(saved.keys() - here.keys())]
    return out


def check_compatible(path: Path, module: nn.Module) -> None:
    """Refuse, before DeepSpeed loads anything, a checkpoint of another model or method.

    One line naming the checkpoint's method and model and the first differing parameters.
    """
    diffs = shape_differences(saved_shapes(path), module_shapes(module))
    if not diffs:
        return
    cfg = read_meta(path).get("config", {})
    method = cfg.get("method", {}).get("name", "?")
    model = cfg.get("model", {})
    saved_by = f"method {method}, model {model.get('name', '?')} patch {model.get('patch_size')}"
    more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    raise ValueError(
        f"checkpoint {path} ({saved_by}) does not fit this model: {'; '.join(diffs[:3])}{more}"
    )


# ---------------------------------------------------------------- disk space and permissions


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file in it; a one-line ``ValueError`` if the
    path is read-only, not a directory or not permitted (root ignores modes, not mounts)."""
    probe = directory / f".write_probe_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"output directory {directory} is not writable: {reason}") from None


def checkpoint_bytes(path: Path) -> int:
    """Bytes of one checkpoint directory (its universal conversion excluded)."""
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and UNIVERSAL not in f.relative_to(path).parts
    )


def check_free_space(root: Path) -> None:
    """Refuse to start a save that cannot fit: free space below the last checkpoint's size."""
    last = latest_complete(root)
    if last is None:
        return
    need, free = checkpoint_bytes(last), _free(root)
    if free < need:
        raise ValueError(
            f"not enough space to save a checkpoint in {root}: {_human(free)} free, "
            f"the last checkpoint ({last.name}) took {_human(need)}"
        )


def _save_error(path: Path, err: BaseException) -> str:
    """One line: what failed, why, and the free space. torch's zip writer reports a full
    disk as ``RuntimeError: unexpected pos ...``; a 1 MiB probe write then names the cause."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        reason = _probe_write(path) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"could not save checkpoint {path}: {reason} ({_human(_free(path))} free there)"


def _probe_write(path: Path) -> str | None:
    """The OS's reason when 1 MiB cannot be written beside ``path``; None when it can."""
    where = path if path.is_dir() else path.parent
    probe = where / f".space_probe_{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as e:
        return e.strerror or str(e)
    finally:
        probe.unlink(missing_ok=True)


def _agree(error: str | None) -> str | None:
    """Collective: the first rank's error, so that every rank stops (or goes on) together."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _rank_files(engine: Any, root: Path, path: Path, rank: int) -> None:
    """This rank's files of a checkpoint: DeepSpeed's, its RNG, and (rank 0) extra state."""
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
