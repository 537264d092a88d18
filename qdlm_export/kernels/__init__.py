"""Compute kernels for quantized linears and rotations: one module per op, a small backend registry.

Each op module holds the op, its torch implementation (the CPU fallback and the ground truth) and
the registration of every backend; Triton kernels sit beside it:

===================  ======================  ============================  ==============================
op                   module                  Triton                        other backends
===================  ======================  ============================  ==============================
weight-only linear   ``weight_only.py``      ``weight_only_triton.py``     ``cpu_native.py`` (C, AVX512-BF16, AMX),
                                                                           ``cpu_packed.py`` (torch CPU),
                                                                           ``cuda_tinygemm.py`` (torch CUDA int4)
grouped expert GEMM  ``grouped_experts.py``  ``grouped_experts_triton.py``
int8 activations     ``int8.py``             ``int8_triton.py``            ``cpu_int8.py`` (C: AMX int8 GEMM,
                                                                           W4A4 on it, per-token quantizer),
                                                                           ``torch._int_mm``
Hadamard             ``hadamard.py``         ``hadamard_triton.py``        fast-hadamard-transform,
                                                                           ``cpu_hadamard.py`` (the format's
                                                                           reference, butterflies in C)
===================  ======================  ============================  ==============================

The C kernels (``native/int4_avx512bf16.c``) are one library, built and loaded by ``native_build.py``.

``registry.py`` picks the backend per call (``backend=``, else ``QDLM_KERNEL_BACKEND=auto|torch|triton``,
read once) and :func:`describe_backend` reports the choice. Triton is optional: nothing here imports
it until a Triton backend runs (``_triton.py``). Importing this package also routes the online
Hadamards of ``core.transforms`` through :func:`hadamard_transform` (see ``hadamard.py``).
"""

from .grouped_experts import grouped_expert_gemm
from .hadamard import HADAMARD_ORDERS, hadamard_matrix, hadamard_transform, split_size
from .int8 import (
    int8_gemm,
    packed_int_linear,
    quantize_per_token,
    w4a4_linear,
    w8a8_linear,
)
from .registry import (
    ENV_VAR,
    KernelBackendError,
    Problem,
    backend_table,
    backends_for,
    configured_backend,
    describe_backend,
    refresh_backend_setting,
    select_backend,
)
from .weight_only import dequantize_packed, unpack_codes, weight_only_linear

__all__ = [
    "ENV_VAR",
    "HADAMARD_ORDERS",
    "KernelBackendError",
    "Problem",
    "backend_table",
    "backends_for",
    "configured_backend",
    "dequantize_packed",
    "describe_backend",
    "grouped_expert_gemm",
    "hadamard_matrix",
    "hadamard_transform",
    "int8_gemm",
    "packed_int_linear",
    "quantize_per_token",
    "refresh_backend_setting",
    "select_backend",
    "split_size",
    "unpack_codes",
    "w4a4_linear",
    "w8a8_linear",
    "weight_only_linear",
]
