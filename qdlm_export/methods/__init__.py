"""Quantization methods, one module each, registered by name."""

from . import awq, gptq, rtn  # noqa: F401  (registers the methods)
from .base import BlockCalibration, QuantMethod
from .registry import available_methods, method_class, register_method

__all__ = ["BlockCalibration", "QuantMethod", "available_methods", "method_class", "register_method"]

from . import duquant, quarot, rtn_wa, smoothquant  # noqa: E402,F401  (weight-activation methods)
