"""Method lookup, keyed by config class: ``make_config`` turns ``--method NAME`` into the method's
config once, and :func:`build_method` builds the method from that config once, with everything the
run needs. Nothing else checks method names."""

from __future__ import annotations

from typing import Any

import torch

from ..core.configs import WeightOnlyConfig
from ..errors import ConfigError
from ..families import FamilyAdapter
from .base import QuantizedLinearBuilder, QuantMethod

_METHODS: dict[type[WeightOnlyConfig], type[QuantMethod]] = {}
_CONFIGS: dict[str, type[WeightOnlyConfig]] = {}


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    if not cls.name or cls.config_class.method != cls.name:
        raise ValueError(f"{cls.__name__}: name {cls.name!r} must be set and equal its config's method")
    _METHODS[cls.config_class] = cls
    _CONFIGS[cls.name] = cls.config_class
    return cls


def config_class(name: str) -> type[WeightOnlyConfig]:
    """The config class of ``--method name`` (what ``-O KEY=VALUE`` options are typed by)."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}", hint=f"available methods: {', '.join(available_methods())}"
        ) from None


def make_config(name: str, **options: Any) -> WeightOnlyConfig:
    """The validated config of method ``name`` (unknown options refused, naming the valid ones)."""
    return config_class(name).from_options(**options)


def method_class(name: str) -> type[QuantMethod]:
    return _METHODS[config_class(name)]


def build_method(
    config: WeightOnlyConfig,
    adapter: FamilyAdapter,
    model_config: Any,
    *,
    scale_dtype: torch.dtype = torch.float32,
    quantized_linear: QuantizedLinearBuilder | None = None,
) -> QuantMethod:
    """The method ``config`` belongs to, built once with everything a run needs."""
    try:
        cls = _METHODS[type(config)]
    except KeyError:
        raise ConfigError(
            f"{type(config).__name__} is not the config of a registered method",
            hint=f"build it with make_config(NAME, ...); available methods: {', '.join(available_methods())}",
        ) from None
    return cls(config, adapter, model_config, scale_dtype=scale_dtype, quantized_linear=quantized_linear)


def available_methods() -> list[str]:
    return sorted(_CONFIGS)
