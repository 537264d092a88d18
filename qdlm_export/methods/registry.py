"""Method lookup: ``quantize --method NAME`` resolves here; the pipeline never checks method names."""

from __future__ import annotations

from ..errors import ConfigError
from .base import QuantMethod

_METHODS: dict[str, type[QuantMethod]] = {}


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[QuantMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}", hint=f"available methods: {', '.join(available_methods())}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_METHODS)
