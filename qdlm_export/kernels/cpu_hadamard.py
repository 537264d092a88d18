"""The format's reference Hadamard transform on the CPU, with its butterflies in C.

A loaded QuaRot or DuQuant checkpoint applies its online Hadamards on the CPU through the format's
reference (``core.hadamard.hadamard_transform_reference``, float32), so that a loaded model computes
bit for bit what the in-memory quantized model computed: the activation codes that follow round at
the same places. Its butterflies (``x @ S_p``) were log2(p) torch passes over memory, each with a
``torch.stack``; on a LLaDA-8B-shaped QuaRot block at 256 tokens they took a third of the step on a
Xeon. ``qdlm_fwht_rows_f32`` (``native/int4_avx512bf16.c``) does the same additions level by level
with each row held in the L1 cache, so the result is the same bit for bit (tested), and the rest of the
reference (``H_m``, the 1/sqrt(n)) is the reference's own code.
"""

from __future__ import annotations

import torch

from ..core.hadamard import hadamard_transform_reference
from .cpu_native import _run_split, _threads, library


def native_butterflies(x: torch.Tensor) -> torch.Tensor:
    """``x @ S_p`` over the last dim (float32, ``p`` a power of two), unnormalised: a contiguous copy
    of ``x`` transformed in place by the C butterflies, its rows shared between torch's threads."""
    p = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.float32)
    y.copy_(x)
    rows = y.numel() // p if p else 0
    if rows:
        fn = library().qdlm_fwht_rows_f32
        ptr, row_bytes = y.data_ptr(), p * 4
        _run_split(lambda a, b: fn(ptr + a * row_bytes, b - a, p), rows, _threads(rows, 64))
    return y


def hadamard_reference_cpu(x: torch.Tensor) -> torch.Tensor:
    """:func:`hadamard_transform_reference` of ``x``, with the C butterflies where they apply (float32
    CPU tensors, the library built) and the torch ones otherwise; the same result either way."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and library() is not None:
        return hadamard_transform_reference(x, sylvester=native_butterflies)
    return hadamard_transform_reference(x)
