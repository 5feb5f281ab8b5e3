"""Frozen modules held beside a method (EMA teachers, distillation teachers, the QAT
reference), and the EMA update that moves a teacher, ZeRO-3 aware.

Design choices:

* :class:`FrozenModules` is a plain object, not an ``nn.Module``, so the method that holds
  it does not register it: its modules are absent from ``parameters()``, ``state_dict()``,
  the optimizer, DeepSpeed's bf16 cast and ZeRO-3's partitioning hooks. They therefore keep
  full weights on every rank, move to the student's device by themselves, and are
  checkpointed (when they change) through the method's ``extra_state()``.
* One precision policy for every frozen module: the weights stay float32 and the forward
  runs under autocast to the dtype of the inputs (bf16 matmuls on bf16 runs, exact float32
  on fp32 runs). An EMA step moves a weight by ``(1 - m) ~ 0.004`` of the gap, about bf16's
  resolution (2^-8), so a bf16 teacher would barely move.
* An :class:`EMATeacher` is a deep copy of student modules made when the method is built,
  i.e. before ``deepspeed.initialize`` (and outside ``deepspeed.zero.Init``). Stochastic
  depth is switched off in the copy (the papers' teachers have none).
* :func:`update_ema` gathers ZeRO-3-partitioned student parameters chunk by chunk with
  ``deepspeed.zero.GatheredParameters`` (every rank gets the full tensor) and lerps plainly
  otherwise. Only parameters are averaged; buffers (batch-norm statistics) are the teacher's own.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
from timm.layers import DropPath
from torch import nn

ZERO3_CHUNK_NUMEL = 1 << 26
"""Elements of student parameters gathered at once under ZeRO-3 (128 MiB in bf16)."""


def cosine_momentum(base: float, progress: float, end: float = 1.0) -> float:
    """``end - (end - base) * (1 + cos(pi * progress)) / 2``: ``base`` at 0, ``end`` at 1."""
    return end - (end - base) * (1 + math.cos(math.pi * progress)) / 2


def is_zero3_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitioned (it holds a placeholder)."""
    return hasattr(p, "ds_id")


@torch.no_grad()
def update_ema(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter.

    Parameters are matched by name; the teacher may have another dtype and device.
    """
    s_named = dict(student.named_parameters())
    t_named = dict(teacher.named_parameters())
    assert s_named.keys() == t_named.keys(), "teacher and student parameters differ"
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = [(s_named[n], t_named[n]) for n in t_named]
    weight = 1.0 - momentum
    if not any(is_zero3_partitioned(s) for s, _ in pairs):
        for s, t in pairs:
            t.lerp_(s.detach().to(device=t.device, dtype=t.dtype), weight)
        return
    import deepspeed  # only here: importing it is slow and prints

    for chunk in _chunks(pairs, ZERO3_CHUNK_NUMEL):
        students = [s for s, _ in chunk]
        with deepspeed.zero.GatheredParameters(students, modifier_rank=None):
            for s, t in chunk:
                t.lerp_(s.detach().to(device=t.device, dtype=t.dtype), weight)


def _chunks(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], max_numel: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
    numel = 0
    for s, t in pairs:
        n = t.numel()  # the teacher holds the full shape
        if chunk and numel + n > max_numel:
            yield chunk
            chunk, numel = [], 0
        chunk.append((s, t))
        numel += n
    if chunk:
        yield chunk


def _refuse_zero3(modules: dict[str, nn.Module]) -> None:
    for module in modules.values():
        if any(is_zero3_partitioned(p) for p in module.parameters()):
            raise ValueError("build the method outside deepspeed.zero.Init (frozen modules)")


class FrozenModules:
    """Named float32 modules without gradients, hidden from ``nn.Module`` registration.

    ``frozen["backbone"]`` is the module held as ``backbone``, and so on. The modules are
    converted in place (float32, ``requires_grad=False``) and start in eval mode.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        _refuse_zero3(modules)
        self.modules = nn.ModuleDict(modules).float()
        self.modules.requires_grad_(False)
        self.modules.eval()

    def __getitem__(self, name: str) -> nn.Module:
        return self.modules[name]

    @property
    def device(self) -> torch.device:
        return next(self.modules.parameters()).device

    def to(self, device: torch.device | str) -> None:
        self.modules.to(device)

    def follow(self, like: torch.Tensor, training: bool = False) -> None:
        """Move to ``like``'s device when needed and take the train/eval mode ``training``."""
        if self.device != like.device:
            self.modules.to(like.device)
        self.modules.train(training)

    @staticmethod
    def autocast(like: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """The precision policy: compute in the inputs' lower precision (bf16/fp16), if any;
        float32 inputs get exact float32."""
        if like.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(device_type=like.device.type, dtype=like.dtype)
        return contextlib.nullcontext()

    def state_dict(self, prefix: str = "teacher.") -> dict[str, torch.Tensor]:
        return {prefix + k: v for k, v in self.modules.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "teacher.") -> None:
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        self.modules.load_state_dict(own)


class EMATeacher(FrozenModules):
    """A float32 EMA copy of named student modules (see :class:`FrozenModules`).

    ``teacher["backbone"]`` is the copy of the student's ``backbone``, and so on.
    """

    def __init__(self, students: dict[str, nn.Module]) -> None:
        _refuse_zero3(students)  # before the copy: a partitioned parameter holds no weights
        super().__init__({k: copy.deepcopy(m) for k, m in students.items()})
        for name, student in students.items():  # the student's mode until the first follow()
            self.modules[name].train(student.training)
        for m in self.modules.modules():
            if isinstance(m, DropPath):
                m.drop_prob = 0.0

    def update(self, students: dict[str, nn.Module], momentum: float) -> None:
        for name, student in students.items():
            update_ema(student, self.modules[name], momentum)
