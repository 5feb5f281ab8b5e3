"""Explicit registries: method name -> (config dataclass, builder).

Each method module registers itself with ``@register_method("name", ConfigClass)``;
``models.methods`` imports every method module so that the registry is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # models.methods imports this module to register itself
    from models.methods.base import Method

MethodBuilder = Callable[..., "Method"]
"""``builder(method_cfg, model_cfg) -> Method``; a method whose config declares
``weight_fields`` gets a third argument: ``{field: models.pretrained.PretrainedWeights}``."""

_METHODS: dict[str, tuple[type, MethodBuilder]] = {}


def register_method(name: str, config_cls: type) -> Callable[[MethodBuilder], MethodBuilder]:
    def wrap(builder: MethodBuilder) -> MethodBuilder:
        if name in _METHODS:
            raise KeyError(f"method {name!r} registered twice")
        _METHODS[name] = (config_cls, builder)
        return builder

    return wrap


def method_names() -> list[str]:
    import models.methods  # noqa: F401  (fills the registry)

    return sorted(_METHODS)


def method_config_class(name: str) -> type:
    import models.methods  # noqa: F401

    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[name][0]


def create_method(
    method_cfg: Any, model_cfg: Any, weights: Mapping[str, Any] | None = None
) -> Method:
    """Build a method. ``weights``: the pretrained weights its config's ``weight_fields``
    name, resolved by the caller (``train.weights.method_weights``); methods read no files."""
    import models.methods  # noqa: F401

    name = method_cfg.name
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}")
    fields = type(method_cfg).weight_fields
    given = dict(weights or {})
    for field in fields:
        if getattr(method_cfg, field) and field not in given:
            raise ValueError(
                f"method.{field}={getattr(method_cfg, field)!r} was not resolved: pass "
                "train.weights.method_weights(method_cfg, model_cfg) to create_method"
            )
    builder = _METHODS[name][1]
    return builder(method_cfg, model_cfg, given) if fields else builder(method_cfg, model_cfg)
