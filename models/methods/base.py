"""The one interface every self-supervised method implements.

A method is an ``nn.Module`` that owns a ``backbone`` (the encoder that gets exported) and
whatever heads, predictors or teachers it needs. The trainer and the checkpoint code call
only the hooks below, all declared on :class:`Method` with a default (never found through
``hasattr``):

* ``forward(batch) -> dict``: ``batch["views"]`` is a list of image tensors ``(B, 3, H, W)``
  (one view for MAE, two for SimCLR/BYOL/MoCo/SimSiam, 2 global + N local for DINO).
  The dict must hold a scalar ``"loss"``; every other scalar tensor is logged as
  ``loss_metrics/<key>``. A method may add ``"embeddings"``: a tuple of two detached
  ``(B, D)`` tensors (two views of the same images) that the collapse monitors read.
* ``before_step(ctx)`` / ``after_step(ctx)``: around every optimizer step (schedules that
  the forward reads; EMA teachers, centers).
* ``no_weight_decay()``: full parameter names that must not get weight decay.
* ``param_groups(weight_decay)``: optimizer groups; the default puts norms, biases and
  ``no_weight_decay()`` names in a group without decay, and splits by
  ``param_lr_scale(name)``. ``lr_scale(group, ctx)`` multiplies the scheduled learning rate
  of a group (a faster predictor; layer-wise decay and freezing in fine-tuning).
* ``teacher_to(device, dtype)``: after ``deepspeed.initialize``, move what the method holds
  outside its registered modules (frozen or EMA teachers, see models.ema) to the device.
* ``extra_state()`` / ``load_extra_state(state)``: tensors outside the optimizer's state
  (EMA teacher, centers, queues) saved with every checkpoint. An EMA teacher is saved as
  ``teacher.<module>.*``; ``method.export_teacher`` exports ``teacher.backbone.*`` and is
  refused at config time for methods whose config does not set ``has_teacher``.
* ``uses_labels``: True when the method trains on labels (fine-tuning); pretraining
  methods never read them.
* ``visualize(batch)``: an optional image grid ``(3, H, W)`` in [0, 1] for TensorBoard.

Methods with an EMA teacher derive from :class:`EMAMethod`, which holds the teacher, its
momentum schedule, its ZeRO-3 gather (models.ema.update_ema) and its state.
The trainer never branches on the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitssl.models.backbones import embed
from vitssl.models.ema import EMATeacher, cosine_momentum

Batch = dict[str, Any]


@dataclass(frozen=True)
class StepContext:
    """Where training stands; every schedule is a pure function of it."""

    step: int
    """Optimizer steps completed so far (0 before the first)."""
    total_steps: int
    """Steps the whole run will take."""
    steps_per_epoch: int
    """Optimizer steps in one pass over the data."""

    @property
    def epoch(self) -> float:
        return self.step / max(1, self.steps_per_epoch)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))


class Method(nn.Module):
    """Base class of every SSL method; see the module docstring for the contract."""

    backbone: nn.Module
    uses_labels: bool = False

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def before_step(self, ctx: StepContext) -> None:
        """Called before the forward of step ``ctx.step`` (e.g. to freeze a layer early on)."""

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimizer step that completed step ``ctx.step - 1``."""

    def no_weight_decay(self) -> set[str]:
        """Full names of parameters without weight decay, gathered from timm's API."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if module is self:
                continue
            fn = getattr(module, "no_weight_decay", None)
            if callable(fn) and not isinstance(module, Method):
                for n in fn():
                    names.add(f"{prefix}.{n}" if prefix else n)
        return names

    def param_lr_scale(self, name: str) -> float:
        """Static learning-rate multiplier of the parameter ``name`` (1 unless a method's
        recipe asks for more, e.g. a faster predictor in BYOL and SimSiam)."""
        return 1.0

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay / no-decay groups of the trainable parameters, one pair per distinct
        ``param_lr_scale``, in a stable order (first appearance)."""
        skip = self.no_weight_decay()
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decay = not (p.ndim <= 1 or name in skip or name.endswith(".bias"))
            groups.setdefault((decay, self.param_lr_scale(name)), []).append(p)
        order = sorted(groups, key=lambda key: (key[1] != 1.0, not key[0]))
        return [
            {
                "params": groups[key],
                "weight_decay": weight_decay if key[0] else 0.0,
                "lr_scale": key[1],
            }
            for key in order
        ]

    def lr_scale(self, group: dict[str, Any], ctx: StepContext) -> float:
        """Multiplier of the scheduled learning rate for one optimizer group at ``ctx.step``.

        The default is the group's static ``lr_scale``; fine-tuning overrides it for a
        freeze-then-unfreeze schedule (scale 0 while a group is frozen).
        """
        return float(group.get("lr_scale", 1.0))

    def teacher_to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Move modules held outside the registered ones to ``device`` (none by default).

        ``dtype`` is the run's compute dtype; frozen modules keep float32 weights and compute
        in the inputs' dtype under autocast (models.ema.FrozenModules).
        """

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors outside the optimizer's state to save with a checkpoint (none by default)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` saved (nothing by default)."""

    @torch.no_grad()
    def visualize(self, batch: Batch) -> torch.Tensor | None:
        """An image grid ``(3, H, W)`` in [0, 1], or None when the method has no picture."""
        return None


class EMAMethod(Method):
    """A method with an EMA teacher of some of its modules (BYOL, MoCo v3, DINO).

    A subclass builds its student modules, then calls :meth:`init_teacher` with their
    attribute names and the base momentum. The teacher (models.ema.EMATeacher: float32,
    unregistered) follows the students after every step with a momentum that rises from
    the base to 1 by a cosine over training, and is saved as ``teacher.<name>.*``.
    """

    teacher: EMATeacher
    ema_names: tuple[str, ...]
    base_momentum: float

    def init_teacher(self, names: tuple[str, ...], base_momentum: float) -> None:
        self.ema_names = names
        self.base_momentum = base_momentum
        # A plain object, so not registered (not cast to bf16, not partitioned): see models.ema.
        self.teacher = EMATeacher(self._students())

    def _students(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.ema_names}

    def momentum(self, ctx: StepContext) -> float:
        """Teacher momentum after step ``ctx.step``: a pure function of the step."""
        return cosine_momentum(self.base_momentum, ctx.progress)

    @torch.no_grad()
    def teacher_output(self, x: torch.Tensor, head: str) -> torch.Tensor:
        """The teacher's ``head(embed(backbone, x))`` in the inputs' precision, as float32."""
        with self.teacher.autocast(x):
            return self.teacher[head](embed(self.teacher["backbone"], x)).float()

    def teacher_to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        self.teacher.to(device)

    def after_step(self, ctx: StepContext) -> None:
        self.teacher.update(self._students(), self.momentum(ctx))

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict(state)
