"""Explicit registries: method name -> (config dataclass, builder).

Each method module registers itself with ``@register_method("name", ConfigClass)``;
``models.methods`` imports every method module so that the registry is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # models.methods imports this module to register itself
    from models.methods.base import Method

MethodBuilder = Callable[[Any, Any], "Method"]
"""``builder(method_cfg, model_cfg) -> Method``."""

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


def create_method(method_cfg: Any, model_cfg: Any) -> Method:
    import models.methods  # noqa: F401

    name = method_cfg.name
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[name][1](method_cfg, model_cfg)
