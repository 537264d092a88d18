"""Kernel dispatch shipped inside self-contained checkpoints (written there as ``qdlm_kernels.py``).

A self-contained export (``loader/selfcontained.py``) carries copies of qdlm-export's loader and its
pure-torch helpers so that ``from_pretrained(..., trust_remote_code=True)`` works with only torch
and transformers installed. This module stands in for the ``qdlm_export.kernels`` package there
(a checkpoint carries modules, not packages) and offers the ops the loader calls. The
integer-activation ops (``quantize_per_token``, ``packed_int_linear``) are the torch
implementations; the weight-only linear has the same backend choice as in the package:

* ``auto`` (default): the Triton dequantize-GEMM when triton is installed and the tensors are on a
  CUDA GPU (and the shape suits it), otherwise the torch fallback (dequantize, then matmul);
* ``torch`` / ``triton``: forced through ``QDLM_KERNEL_BACKEND`` or ``backend=``; a forced Triton
  that cannot run raises. ``TRITON_INTERPRET=1`` lets a forced Triton run on CPU tensors (tests).

Unlike the package (``kernels/registry.py`` reads it once), this stand-in keeps no state and reads
the variable on each call.

Online Hadamards need nothing from here: without the package's kernels, the copied
``core/transforms.py`` applies its default, the format's torch reference (the package does too on
the CPU unless a backend is forced; on a GPU it runs the same matrices through its kernels).

In the package this file imports the package's modules; ``make_self_contained`` rewrites those
imports to the copies it writes next to it (``qdlm_weight_only.py``, ``qdlm__triton.py``, ...).
"""

from __future__ import annotations

import os

import torch

from ..kernels._triton import triton_unavailable_reason
from ..kernels.int8 import packed_int_linear_torch as packed_int_linear
from ..kernels.int8 import quantize_per_token_torch as quantize_per_token
from ..kernels.weight_only import triton_unsupported_reason, weight_only_linear_torch

__all__ = ["packed_int_linear", "quantize_per_token", "requested_backend", "weight_only_backend", "weight_only_linear"]

ENV_VAR = "QDLM_KERNEL_BACKEND"
FAMILIES = ("auto", "torch", "triton")


def requested_backend(backend: str | None = None) -> str:
    value = backend if backend is not None else (os.environ.get(ENV_VAR, "").strip().lower() or "auto")
    if value not in FAMILIES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a kernel backend; use one of {', '.join(FAMILIES)}")
    return value


def weight_only_backend(x: torch.Tensor, bits: int, group_size: int, in_features: int, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"``: what :func:`weight_only_linear` runs for this input and weight."""
    request = requested_backend(backend)
    if request == "torch":
        return "torch"
    reason = triton_unavailable_reason(x.device) or triton_unsupported_reason(
        bits=bits, group_size=group_size, in_features=in_features, dtype=x.dtype
    )
    if reason is None and (request == "triton" or x.device.type == "cuda"):
        return "triton"
    if request == "triton":
        raise RuntimeError(f"{ENV_VAR}=triton cannot run this layer on {x.device}: {reason}")
    return "torch"


def weight_only_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W_hat.T + bias`` in ``x.dtype``, ``W_hat`` dequantized from the packed weight."""
    if weight_only_backend(x, bits, group_size, in_features, backend) == "triton":
        from ..kernels.weight_only_triton import weight_only_linear_triton

        return weight_only_linear_triton(x, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias)
    return weight_only_linear_torch(x, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias)

