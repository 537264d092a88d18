"""The torch implementations of every op in one import (kept for code that imported this module).

The implementations live beside their Triton versions: ``weight_only.py``, ``int8.py``,
``hadamard.py``. Tests do not compare kernels against these: they build float64 references from the
unpacked codes themselves.
"""

from __future__ import annotations

from .hadamard import hadamard_matrix, hadamard_transform_torch
from .int8 import int8_gemm_torch, packed_int_linear_torch, quantize_per_token_torch
from .weight_only import dequantize_packed, unpack_codes, weight_only_linear_torch

weight_only_linear_reference = weight_only_linear_torch

__all__ = [
    "dequantize_packed",
    "hadamard_matrix",
    "hadamard_transform_torch",
    "int8_gemm_torch",
    "packed_int_linear_torch",
    "quantize_per_token_torch",
    "unpack_codes",
    "weight_only_linear_reference",
    "weight_only_linear_torch",
]
