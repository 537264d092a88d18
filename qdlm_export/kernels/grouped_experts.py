"""Grouped expert GEMM: the routed experts of one mixture-of-experts projection in one op.

    y[t] = x[t] @ W_hat[e].T   for the rows t in [offsets[e], offsets[e + 1]) of expert e

``x [T, K]`` holds the tokens sorted by expert (a token routed to k experts appears k times);
``offsets`` (integer ``[E + 1]``, ``offsets[0] == 0``, ``offsets[E] == T``, non-decreasing) gives each
expert's rows, so an expert no token chose has an empty range. The weight of every expert is one
*stacked* packed weight, each slice ``[e]`` in the weight-only layout of ``weight_only.py``
(docs/FORMAT.md): ``weight_packed`` int32 ``[E, N, ceil(K*bits/32)]``, ``weight_scale`` ``[E, N,
groups]``, ``weight_zero_point`` uint8 ``[E, N, groups]`` or None (symmetric). Every expert has the same
bits, group size and shape (the loader falls back to the per-expert loop otherwise).

Backends (registered at the end; the registry chooses as for the other ops): the Triton kernel
(``grouped_experts_triton.py``: one launch over (tile of one expert's rows, N tile), dequantizing in
the kernel) and the torch reference here (each expert with tokens: dequantize, one matmul).
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from .registry import choose, on_cuda, register_backend
from .weight_only import dequantize_packed, triton_problem_unsupported

OP = "grouped_expert_gemm"


def check_grouped_arguments(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    in_features: int,
) -> None:
    """Shape checks every backend shares (no device sync: the offsets' values are not read)."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [tokens, {in_features}], got {tuple(x.shape)}")
    if weight_packed.dim() != 3 or weight_packed.dtype != torch.int32:
        raise ValueError(f"weight_packed must be int32 [experts, out, words], got {weight_packed.dtype} "
                         f"{tuple(weight_packed.shape)}")
    experts, n_out = weight_packed.shape[:2]
    if weight_scale.dim() != 3 or tuple(weight_scale.shape[:2]) != (experts, n_out):
        raise ValueError(f"weight_scale must be [{experts}, {n_out}, groups], got {tuple(weight_scale.shape)}")
    if weight_zero_point is not None and tuple(weight_zero_point.shape) != tuple(weight_scale.shape):
        raise ValueError(f"weight_zero_point has shape {tuple(weight_zero_point.shape)}, expected "
                         f"{tuple(weight_scale.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] != experts + 1 or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be integer [{experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}")


def grouped_expert_gemm_torch(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The reference: for each expert with rows, dequantize its weight to ``x.dtype`` and multiply.

    Reads the offsets on the host (one sync); experts without rows are never dequantized."""
    check_grouped_arguments(x, offsets, weight_packed, weight_scale, weight_zero_point, in_features)
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"offsets must rise from 0 to the {x.shape[0]} rows of x, got {bounds}")
    y = x.new_empty(x.shape[0], weight_packed.shape[1])
    for e, (start, end) in enumerate(pairwise(bounds)):
        if end > start:
            zero = None if weight_zero_point is None else weight_zero_point[e]
            w = dequantize_packed(weight_packed[e], weight_scale[e], zero, bits, group_size, in_features, x.dtype)
            y[start:end] = F.linear(x[start:end], w)
    return y


def _grouped_expert_gemm_triton(*args: object, **kwargs: object) -> torch.Tensor:
    # imported on first use (_triton.py)
    from .grouped_experts_triton import grouped_expert_gemm_triton

    return grouped_expert_gemm_triton(*args, **kwargs)


register_backend(
    OP, "triton", _grouped_expert_gemm_triton, family="triton", priority=20, unsupported=triton_problem_unsupported,
    auto=on_cuda, summary="one launch over every expert's row tiles: fused unpack + grouped dequant-GEMM",
)
register_backend(OP, "torch", grouped_expert_gemm_torch, family="torch", priority=0,
                 summary="per expert with tokens: dequantize + matmul")


def grouped_expert_gemm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Expert-sorted ``x [T, K]`` times each expert's dequantized weight -> ``[T, N]`` in ``x.dtype``."""
    b = choose(
        OP,
        x.device,
        backend,
        M=x.shape[0],
        K=in_features,
        N=weight_packed.shape[1],
        E=weight_packed.shape[0],
        bits=bits,
        group_size=group_size,
        symmetric=weight_zero_point is None,
        dtype=x.dtype,
    )
    return b.impl(x, offsets, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features)
