"""Explicit registries: method name -> (config dataclass, builder).

Each method module registers itself with ``@register_method("name", ConfigClass)``;
``vitssl.models.methods`` imports every method module so that the registry is complete.

:class:`MethodConfig` is the base of every method's config. It lives here, beside the
registry and outside ``models.methods``, so that the run config (``train/config.py``) can type
its ``method`` table without importing any method (nor torch). Configs check themselves in
``__post_init__`` and raise ``ValueError`` with a one-line message naming the key; the
config loader turns that into its ``config error: ...`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # models.methods imports this module to register itself
    from vitssl.models.methods.base import Method


@dataclass
class MethodConfig:
    """Base of every method's config; each method subclasses it with its own fields.

    A subclass that defines ``__post_init__`` calls ``super().__post_init__()``.
    """

    has_teacher: ClassVar[bool] = False
    """True for methods whose checkpoints hold an EMA teacher (``teacher.backbone.*`` in the
    extra state) that ``export_teacher`` can export."""
    weight_fields: ClassVar[dict[str, bool]] = {}
    """Fields that name pretrained weights -> whether those must fit ``model``. The entry
    points resolve them (``vitssl.train.weights.method_weights``) and ``create_method`` hands the
    method the result, so that methods never read files."""

    name: str = "mae"
    """The method: mae, simclr, mocov3, byol, simsiam, dino, distil, finetune, qat."""
    export_teacher: bool = False
    """Export and evaluate the EMA teacher's backbone instead of the trained one (methods
    with a teacher only; DINO's default, as its authors evaluate the teacher)."""

    def __post_init__(self) -> None:
        if self.export_teacher and not self.has_teacher:
            raise ValueError(
                f"method.export_teacher=true needs a method with an EMA teacher "
                f"(byol, mocov3, dino); {self.name} has none"
            )


MethodBuilder = Callable[..., "Method"]
"""``builder(method_cfg, model_cfg) -> Method``; a method whose config declares
``weight_fields`` gets a third argument: ``{field: models.pretrained.PretrainedWeights}``."""

_METHODS: dict[str, tuple[type[MethodConfig], MethodBuilder]] = {}


def register_method(
    name: str, config_cls: type[MethodConfig]
) -> Callable[[MethodBuilder], MethodBuilder]:
    assert issubclass(config_cls, MethodConfig), config_cls

    def wrap(builder: MethodBuilder) -> MethodBuilder:
        if name in _METHODS:
            raise KeyError(f"method {name!r} registered twice")
        _METHODS[name] = (config_cls, builder)
        return builder

    return wrap


def _entry(name: str) -> tuple[type[MethodConfig], MethodBuilder]:
    import vitssl.models.methods  # noqa: F401  (fills the registry)

    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return _entry(name)[0]


def create_method(
    method_cfg: Any, model_cfg: Any, weights: Mapping[str, Any] | None = None
) -> Method:
    """Build a method. ``weights``: the pretrained weights its config's ``weight_fields``
    name, resolved by the caller (``train.weights.method_weights``); methods read no files."""
    builder = _entry(method_cfg.name)[1]
    fields = type(method_cfg).weight_fields
    given = dict(weights or {})
    for field in fields:
        if getattr(method_cfg, field) and field not in given:
            raise ValueError(
                f"method.{field}={getattr(method_cfg, field)!r} was not resolved: pass "
                "vitssl.train.weights.method_weights(method_cfg, model_cfg) to create_method"
            )
    return builder(method_cfg, model_cfg, given) if fields else builder(method_cfg, model_cfg)
