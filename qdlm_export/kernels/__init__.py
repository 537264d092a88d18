"""Compute kernels for quantized linears and rotations.

Each op has a torch implementation (the CPU fallback and the ground truth) beside a Triton one:

==================  ======================  =========================  =========================
op                  torch                   Triton                     notes
==================  ======================  =========================  =========================
weight-only linear  ``weight_only.py``      ``weight_only_triton.py``  2/3/4/8-bit packed weights
int8 activations    ``int8.py``             ``int8_triton.py``         quantize, W8A8, W4A4
Hadamard            ``hadamard.py``         ``hadamard_triton.py``     + fast_hadamard_transform
==================  ======================  =========================  =========================

``dispatch.py`` picks the backend per call (``QDLM_KERNEL_BACKEND=auto|torch|triton``) and
:func:`describe_backend` reports the choice. Triton is optional: nothing here imports it until a
Triton backend runs.
"""

from .dispatch import (
    ENV_VAR,
    KernelBackendError,
    backend_table,
    describe_backend,
    hadamard_transform,
    int8_gemm,
    packed_int_linear,
    quantize_per_token,
    select_backend,
    w4a4_linear,
    w8a8_linear,
    weight_only_linear,
)
from .hadamard import HADAMARD_ORDERS, hadamard_matrix, split_size
from .weight_only import dequantize_packed, unpack_codes

__all__ = [
    "ENV_VAR",
    "HADAMARD_ORDERS",
    "KernelBackendError",
    "backend_table",
    "dequantize_packed",
    "describe_backend",
    "hadamard_matrix",
    "hadamard_transform",
    "int8_gemm",
    "packed_int_linear",
    "quantize_per_token",
    "select_backend",
    "split_size",
    "unpack_codes",
    "w4a4_linear",
    "w8a8_linear",
    "weight_only_linear",
]
