"""Weight-only linear for many tokens, Triton backend ``triton_dequant``: dequantize once, then cuBLAS.

``W_hat = (q - z) * s`` is written once as a dense ``[out_features, in_features]`` matrix in the
activation dtype by one Triton pass over the packed weight (each element computed in float32 and
rounded once, as ``weight_only.dequantize_packed``), then ``torch.nn.functional.linear`` runs the
dense GEMM. For many tokens the fused kernel (``weight_only_triton.py``) dequantizes every weight
tile once per row tile of ``x``; this writes the bf16 weight once (about 34 MB at 4096 x 4096 plus
what the GEMM reads back) and leaves the MMAs to cuBLAS. ``weight_only.CUDA_FUSED_MAX_M`` is where
``auto`` switches to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import cdiv
from .weight_only import scale_groups, triton_block_k, triton_unsupported_reason
from .unpack_triton import unpack_code_rows
from .weight_only_triton import unit_stride_rows


@triton.jit
def _dequantize_kernel(
    wp_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    group_size,
    stride_wn,
    stride_sn,
    stride_zn,
    stride_on,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    q = unpack_code_rows(wp_ptr, stride_wn, k0, offs_n, K, N, BITS, BLOCK_K)  # [BLOCK_N, BLOCK_K]
    g = k0 // group_size  # BLOCK_K divides group_size: one group per tile
    if HAS_ZERO:
        w = q - tl.load(z_ptr + offs_n * stride_zn + g, mask=n_ok, other=0).to(tl.int32)[:, None]
    else:
        w = q - (1 << (BITS - 1))
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(
        w_ptr + offs_n[:, None] * stride_on + offs_k[None, :],
        (w.to(tl.float32) * s[:, None]).to(w_ptr.dtype.element_ty),
        mask=n_ok[:, None] & (offs_k[None, :] < K),
    )


def dequantize_packed_triton(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W_hat = (q - z) * s`` as ``[out_features, in_features]`` in ``dtype``: one pass over the packed
    weight, each element computed in float32 and rounded once (as ``weight_only.dequantize_packed``)."""
    reason = triton_unsupported_reason(bits=bits, group_size=group_size, in_features=in_features, dtype=dtype)
    if reason:
        raise ValueError(f"triton dequantize: {reason}")
    n_out = weight_packed.shape[0]
    scale_groups(weight_scale, n_out, group_size, in_features)  # checks the scale's shape
    w = out if out is not None else torch.empty(n_out, in_features, dtype=dtype, device=weight_packed.device)
    if tuple(w.shape) != (n_out, in_features) or w.stride(-1) != 1:
        raise ValueError(f"out must be a row-contiguous [{n_out}, {in_features}] tensor, got {tuple(w.shape)}")
    if n_out == 0 or in_features == 0:
        return w
    wp, scale, zero = unit_stride_rows(weight_packed, weight_scale, weight_zero_point)
    block_k = triton_block_k(group_size, cap=128) or 16
    block_n = 32
    _dequantize_kernel[(cdiv(n_out, block_n), cdiv(in_features, block_k))](
        wp,
        scale,
        zero if zero is not None else scale,
        w,
        n_out,
        in_features,
        in_features if group_size == -1 else group_size,
        wp.stride(0),
        scale.stride(0),
        zero.stride(0) if zero is not None else 0,
        w.stride(0),
        BITS=bits,
        HAS_ZERO=zero is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return w


def weight_only_linear_triton_dequant(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W_hat.T + bias`` with ``W_hat`` dequantized into ``x.dtype`` by one Triton pass, then the
    dense GEMM (cuBLAS on a GPU). Holds one dequantized weight for the duration of the call."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    w = dequantize_packed_triton(weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
