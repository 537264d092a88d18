"""Quantization methods, one module each (config and algorithm), registered by config class; shared
input capture (``capture``), folding (``folding``) and the weight-activation framework."""

from . import awq, duquant, gptq, quarot, rtn, rtn_wa, smoothquant  # noqa: F401  (registers the methods)
from .base import BlockCalibration, QuantMethod
from .registry import available_methods, build_method, config_class, make_config, method_class, register_method

__all__ = [
    "BlockCalibration", "QuantMethod", "available_methods", "build_method", "config_class", "make_config",
    "method_class", "register_method",
]
