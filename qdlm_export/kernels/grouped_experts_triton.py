"""Grouped expert GEMM, Triton backend: every expert of a projection in one launch.

Same arguments as :func:`qdlm_export.kernels.grouped_experts.grouped_expert_gemm_torch`. The grid is
(row tile, N tile). A row tile is ``BLOCK_M`` rows of *one* expert; the tile -> (expert, first row,
end row) map is built on the device from the offsets (no host sync, so the launch does not wait for
the router): expert ``e`` has ``ceil(count_e / BLOCK_M)`` tiles, and their total is at most
``ceil(T / BLOCK_M) + E``, the grid's first dimension. Tiles past the total are empty (their end row
is their first row): they run no K step and store nothing. An expert without rows has no tile.

Inside a tile the arithmetic is the weight-only kernel's (``weight_only_triton.py``): codes unpacked
from the expert's slice of the stacked int32 words, each K step's tile dequantized by
``dequantize_tile`` (in the activations' 16-bit dtype where that is exact) and accumulated in fp32;
per-channel weights multiply the integers ``q - z`` and scale the accumulator once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import cdiv, dot_upcast
from .grouped_experts import check_grouped_arguments
from .layouts import group_major_qparams
from .weight_only import triton_block_k, triton_unsupported_reason
from .unpack_triton import unpack_code_rows
from .weight_only_triton import (OFFSET_CODE_FLOATS, dequantize_tile, dequantizes_in_x, unit_stride_rows,
                                 zero_points)


@triton.jit
def _grouped_gemm_kernel(
    x_ptr,
    wp_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    tile_end_ptr,
    N,
    K,
    group_size,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_sg,
    stride_ze,
    stride_zn,
    stride_zg,
    stride_ym,
    stride_yn,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    DEQUANT_IN_X: tl.constexpr,
    CODE_BASE: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    first = tl.load(tile_row_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < end
    n_ok = offs_n < N
    wp = wp_ptr + expert * stride_we
    sp = s_ptr + expert * stride_se
    zp = z_ptr + expert * stride_ze
    k_stop = tl.where(end > first, K, 0)  # an empty tile runs no K step
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=m_ok[:, None] & (k[None, :] < K),
            other=0.0,
        )
        q = unpack_code_rows(wp, stride_wn, k0, offs_n, K, N, BITS, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        g = k0 // group_size  # the one group this K step lies in (0 when per channel)
        z = zero_points(zp, offs_n * stride_zn + g * stride_zg, n_ok, HAS_ZERO, BITS)
        if PER_CHANNEL:
            s = z  # unused: per channel, the scale multiplies the accumulator once at the end
        else:  # the group's scale in the tile, as in weight_only_triton
            s = tl.load(sp + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
        x, w = dequantize_tile(x, q, z, s, PER_CHANNEL, UPCAST, DEQUANT_IN_X, CODE_BASE, CODE_BITS)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if PER_CHANNEL:
        s = tl.load(sp + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def pick_config(rows: int, experts: int, n_out: int, group_size: int) -> dict:
    """Tile sizes from the mean rows per expert (heuristic, not autotuned): few rows per expert (the
    usual case with many experts) want short row tiles, so that little of each tile is padding."""
    mean_rows = rows / max(experts, 1)
    if mean_rows <= 16:
        # 8 warps: with 4, ptxas spills 2 KB a thread for asymmetric weights on sm_90
        # (benchmarks/triton_compile_check.py); with 8 neither kind spills
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}
    elif mean_rows <= 64:
        cfg = {"BLOCK_M": 32 if mean_rows <= 32 else 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    cfg["BLOCK_K"] = triton_block_k(group_size, cap=cfg["BLOCK_K"]) or 16
    return cfg


def tile_map(offsets: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, first row, end row) of every row tile, int32 ``[ceil(rows / block_m) + E]``, on the
    offsets' device without reading them on the host; tiles past the last expert's are empty."""
    offsets = offsets.to(torch.int64)
    experts = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m
    last_tile = tiles.cumsum(0)  # tiles of experts 0..e
    index = torch.arange(cdiv(rows, block_m) + experts, device=offsets.device)
    expert = torch.searchsorted(last_tile, index, right=True)  # the first expert whose tiles reach past it
    used = expert < experts
    expert = expert.clamp_(max=experts - 1)
    first = offsets[expert] + (index - (last_tile[expert] - tiles[expert])) * block_m
    end = offsets[expert + 1]
    first = torch.where(used, first, 0)
    end = torch.where(used, end, 0)
    return expert.to(torch.int32), first.to(torch.int32), end.to(torch.int32)


def grouped_expert_gemm_triton(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Triton grouped dequantize-GEMM: ``x [T, K]`` sorted by expert -> ``[T, N]`` in ``x.dtype``."""
    reason = triton_unsupported_reason(bits=bits, group_size=group_size, in_features=in_features, dtype=x.dtype)
    if reason:
        raise ValueError(f"triton grouped expert GEMM: {reason}")
    check_grouped_arguments(x, offsets, weight_packed, weight_scale, weight_zero_point, in_features)
    experts, n_out = weight_packed.shape[:2]
    groups = 1 if group_size == -1 else in_features // group_size
    if weight_scale.shape[2] != groups:
        raise ValueError(f"weight_scale has {weight_scale.shape[2]} groups a row, expected {groups}")
    rows = x.shape[0]
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows == 0 or n_out == 0:
        return y
    (wp,) = unit_stride_rows(weight_packed)
    scale, zero = group_major_qparams(weight_packed, weight_scale, weight_zero_point)  # read ahead of the K loop
    cfg = pick_config(rows, experts, n_out, group_size)
    code_base, code_bits = OFFSET_CODE_FLOATS.get(x.dtype, (0, 0))
    tile_expert, tile_row, tile_end = tile_map(offsets.to(x.device), rows, cfg["BLOCK_M"])
    grid = (tile_expert.shape[0], cdiv(n_out, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        x,
        wp,
        scale,
        zero if zero is not None else scale,
        y,
        tile_expert,
        tile_row,
        tile_end,
        n_out,
        in_features,
        in_features if group_size == -1 else group_size,
        x.stride(0),
        x.stride(1),
        wp.stride(0),
        wp.stride(1),
        scale.stride(0),
        scale.stride(1),
        scale.stride(2),
        zero.stride(0) if zero is not None else 0,
        zero.stride(1) if zero is not None else 0,
        zero.stride(2) if zero is not None else 0,
        y.stride(0),
        y.stride(1),
        BITS=bits,
        HAS_ZERO=zero is not None,
        PER_CHANNEL=groups == 1,
        UPCAST=dot_upcast(x.dtype),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DEQUANT_IN_X=dequantizes_in_x(x.dtype, bits, weight_scale.dtype, groups),
        CODE_BASE=code_base,
        CODE_BITS=code_bits,
        **cfg,
    )
    return y
