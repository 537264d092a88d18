"""Integer-activation kernels, Triton backend (same conventions as ``int8.py``).

* :func:`quantize_per_token_triton` -- fused per-row absmax, scale, round and int8 store (one kernel,
  two passes over the row: max, then quantize). 8-bit, or 4-bit values held in int8.
* :func:`int8_gemm_triton` -- int8 x int8 -> int32 on the tensor cores, with the per-token and
  per-channel scales and the bias applied in the epilogue.
* :func:`packed_int_linear_triton` -- the W4A4 path: int8 activations times the *packed* weight.
  Hopper has no int4 MMA, so each K step unpacks its weight tile to ``q - z`` in int8 (the same
  unpacking as the weight-only kernel) and feeds an int8 MMA. Per-channel weights keep an int32
  accumulator across all of K; grouped weights convert each K step's int32 partial sum to float and
  apply that group's scale (``BLOCK_K`` divides ``group_size``).

Every function takes ``out=`` so that tests can hand in a poisoned buffer.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import cdiv, next_power_of_2

from .int8 import qmax_for, triton_packed_unsupported_reason
from .tuned import tile_config
from .layouts import LaunchPlans, group_major_qparams
from .weight_only import triton_block_k
from .unpack_triton import unpack_code_rows
from .weight_only_triton import tile_offsets


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    clip_ratio,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    # The float32 operations of the torch backend, in its order. div_rn: IEEE division (`/` may
    # be 2 ulp off on GPUs).
    scale = tl.math.div_rn(amax * clip_ratio, tl.zeros_like(amax) + QMAX)
    tl.store(s_ptr + rows, scale, mask=row_ok)
    inv = tl.where(scale > 0, tl.math.div_rn(tl.zeros_like(scale) + 1.0, tl.where(scale > 0, scale, 1.0)), 0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols[None, :] < K)
        v = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        v = v * inv[:, None]
        r = tl.floor(tl.abs(v) + 0.5)  # round half away from zero ...
        r = tl.minimum(tl.where(v < 0, -r, r), QMAX)  # ... sign back, clamp to [-QMAX, QMAX]
        r = tl.maximum(r, -QMAX)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], r.to(tl.int8), mask=ok)


def quantize_per_token_triton(
    x: torch.Tensor,
    bits: int = 8,
    clip_ratio: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> ``(x_q int8 [..., K], x_scale float32 [..., 1])``; see ``int8.py``."""
    qmax = qmax_for(bits)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        q = torch.empty(*x.shape, dtype=torch.int8, device=x.device)
        s = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    else:
        q, s = out
    q2 = q.view(-1, K)
    if M == 0:
        return q, s
    if K == 0:
        s.zero_()
        return q, s
    block_k = min(1024, next_power_of_2(K))
    block_m = max(1, min(16, 4096 // block_k))
    _quantize_rows_kernel[(cdiv(M, block_m),)](
        x2,
        q2,
        s.view(-1),
        M,
        K,
        x2.stride(0),
        q2.stride(0),
        float(clip_ratio),
        QMAX=qmax,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return q, s


def _gemm_config(M: int, N: int) -> dict:
    """Tile sizes (heuristic, not autotuned); int8 MMAs want BLOCK_K >= 32.

    The fastest candidates of ``benchmarks/triton_sweep.py`` on an H200 (2026-12-04, CUDA-graph GPU
    time, K x N = 4096 x 4096 and 4096 x 12288) for both the int8 GEMM and the W4A4 packed GEMM:
    narrow 32-column tiles with BLOCK_K 256 at M <= 16 (1.4-2.2x dense bf16 against 1.05-1.5x for
    64 x 128); 64-row tiles at M <= 256, 64 columns wide when N <= 4096 (more programs than SMs);
    256 x 128 x 128 above (1.5x; W4A4 0.51-0.61x against 0.40-0.44x for 128 x 128 x 64).
    """
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    if M <= 256:
        if N <= 4096:
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    # 256 x 128 x 128 int8 tiles take 144 KiB of shared memory over 3 stages: Hopper-class GPUs only
    if _large_shared_memory():
        return dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@functools.cache
def _large_shared_memory() -> bool:
    """Whether the current CUDA device gives a block at least 200 KiB of shared memory (H100/H200: 227)."""
    if not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 0) >= 200 * 1024


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    as_ptr,
    bs_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    B_CODES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0
        )
        # b is [N, K] row-major; the tile is read as its transpose [BLOCK_K, BLOCK_N].
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + k[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0
        )
        if B_CODES:  # a checkpoint's symmetric 8-bit codes q (uint8) -> q - 128 (int16 keeps every
            # Triton's promotion rules out of it: older ones widen uint8 ^ int to int32)
            b = (b.to(tl.int16) - 128).to(tl.int8)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    y = acc.to(tl.float32)
    y = y * tl.load(as_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    y = y * tl.load(bs_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        y.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def _output(lead: tuple, n: int, dtype: torch.dtype, device, out: torch.Tensor | None) -> torch.Tensor:
    y = out if out is not None else torch.empty(*lead, n, dtype=dtype, device=device)
    if tuple(y.shape) != (*lead, n):
        raise ValueError(f"out has shape {tuple(y.shape)}, expected {(*lead, n)}")
    return y


def int8_gemm_triton(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``(a_q @ b_q.T) * a_scale * b_scale.T + bias``; shapes as in ``int8.int8_gemm_torch``."""
    if a_q.dtype != torch.int8 or b_q.dtype != torch.int8:
        raise ValueError(f"int8_gemm expects int8 operands, got {a_q.dtype} and {b_q.dtype}")
    K = a_q.shape[-1]
    N = b_q.shape[0]
    lead = a_q.shape[:-1]
    a2 = a_q.reshape(-1, K)
    M = a2.shape[0]
    y = _output(lead, N, out_dtype, a_q.device, out)
    y2 = y.view(-1, N)
    if M == 0 or N == 0:
        return y
    _int8_gemm_plan(M, N, K, b_scale, bias, False, a_q.device, config)(a2, a_scale.reshape(-1).contiguous(), b_q, y2)
    return y


def _int8_gemm_plan(M: int, N: int, K: int, b_scale: torch.Tensor, bias: torch.Tensor | None, b_codes: bool,
                    device: torch.device, config: dict | None):
    """``launch(a2, a_s, b, y2)``: the int8 GEMM kernel on ``a2 [M, K]`` (row scales ``a_s [M]``) and the
    weight rows ``b`` (int8 values, or with ``b_codes`` a symmetric weight's uint8 codes ``q``; ``b``'s
    first K columns are used) into ``y2 [M, N]``, its tiles and the weight's scales fixed."""
    b_s = b_scale.reshape(-1).contiguous()
    # config: tuning only; else the one measured fastest for this shape on this GPU model (tuned.py)
    cfg = dict(config) if config else tile_config("int8", M, N, K, device) or _gemm_config(M, N)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    bias_arg = bias if bias is not None else b_s

    def launch(a2: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, y2: torch.Tensor) -> None:
        _int8_gemm_kernel[grid](a2, b, a_s, b_s, bias_arg, y2, M, N, K, a2.stride(0), a2.stride(1), b.stride(0),
                                b.stride(1), y2.stride(0), y2.stride(1), HAS_BIAS=bias is not None, B_CODES=b_codes,
                                **cfg)

    return launch


@triton.jit
def _packed_int_gemm_kernel(
    x_ptr,
    xs_ptr,
    wp_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_ym,
    stride_yn,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # per channel: one exact int32 sum over K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # grouped: sum of scaled group partials
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_ok[:, None] & (k[None, :] < K), other=0
        )
        q = unpack_code_rows(wp_ptr, stride_wn, k0, offs_n, K, N, BITS, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        g = k0 // group_size
        if HAS_ZERO:
            w = q - tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_ok, other=0).to(tl.int32)[:, None]
        else:
            w = q - (1 << (BITS - 1))
        w = tl.trans(w.to(tl.int8))  # |q - z| <= 15 for 4 bits; 8 bits only symmetric: [-128, 127]
        if PER_CHANNEL:
            acc_i = tl.dot(x, w, acc_i, out_dtype=tl.int32)
        else:
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            acc += tl.dot(x, w, out_dtype=tl.int32).to(tl.float32) * s[None, :]
    if PER_CHANNEL:
        acc = acc_i.to(tl.float32)
    acc = acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


_PLANS = LaunchPlans()


def _packed_plan(M: int, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 bias: torch.Tensor | None, device: torch.device, config: dict | None):
    """``launch(x2, xs, y2, weight_packed)`` for ``M`` rows against this weight: the kernel, grid, tiles and
    the scales' arguments fixed (``layouts.LaunchPlans`` holds it beside the weight; ``config``:
    tuning only). It holds neither the packed weight nor a view of it, which would keep it alive for good."""
    reason = triton_packed_unsupported_reason(
        bits=bits, group_size=group_size, in_features=in_features, symmetric=weight_zero_point is None
    )
    if reason:
        raise ValueError(f"triton packed int GEMM: {reason}")
    N = weight_packed.shape[0]
    groups = 1 if group_size == -1 else in_features // group_size
    if tuple(weight_scale.shape) != (N, groups):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected {(N, groups)}")
    if bits == 8 and weight_zero_point is None and groups == 1:
        # W8A8 as a checkpoint holds it: byte k of a row is code k, so the tuned int8 GEMM reads the
        # codes themselves (top bit flipped in registers) instead of the unpack-per-tile kernel below
        gemm = _int8_gemm_plan(M, N, in_features, weight_scale, bias, True, device, config)

        def launch_int8(x2: torch.Tensor, xs: torch.Tensor, y2: torch.Tensor, weight: torch.Tensor) -> None:
            gemm(x2, xs, weight.contiguous().view(torch.uint8), y2)

        return launch_int8
    scale, zero = group_major_qparams(weight_packed, weight_scale, weight_zero_point)  # read ahead of the K loop
    measured = None if config or groups > 1 or bits != 4 else tile_config("w4a4", M, N, in_features, device)
    cfg = dict(config) if config else measured or _gemm_config(M, N)
    if not config and groups > 1:
        # Grouped weights keep a float32 accumulator beside each step's int32 partial sum: at 256-row
        # tiles ptxas spills 1.7-2.8 KB a thread on sm_90 (benchmarks/triton_compile_check.py), at
        # 128 rows none (symmetric) or 0.3 KB (asymmetric, 64-wide K steps). Zero points at 64-row
        # tiles with 128-wide K steps spill 0.4 KB (sm_90) to 0.9 KB (sm_80), with 64-wide none.
        if cfg["BLOCK_M"] > 128:
            cfg.update(BLOCK_M=128, BLOCK_K=128)
        if weight_zero_point is not None and cfg["BLOCK_M"] >= 64:
            cfg["BLOCK_K"] = 64
    cfg["BLOCK_K"] = triton_block_k(group_size, cap=cfg["BLOCK_K"])
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    qparams = (scale, zero if zero is not None else scale, bias if bias is not None else scale)
    fixed = (M, N, in_features, in_features if group_size == -1 else group_size)
    strides = (scale.stride(0), scale.stride(1),
               zero.stride(0) if zero is not None else 0, zero.stride(1) if zero is not None else 0)
    constexprs = dict(BITS=bits, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, PER_CHANNEL=groups == 1, **cfg)

    def launch_packed(x2: torch.Tensor, xs: torch.Tensor, y2: torch.Tensor, weight: torch.Tensor) -> None:
        wp = weight.contiguous()
        _packed_int_gemm_kernel[grid](x2, xs, wp, *qparams, y2, *fixed, x2.stride(0), x2.stride(1), wp.stride(0),
                                      *strides, y2.stride(0), y2.stride(1), **constexprs)

    return launch_packed


def packed_int_linear_triton(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """int8 activations x packed weight; arguments as in ``int8.packed_int_linear_torch``."""
    if x_q.dtype != torch.int8:
        raise ValueError(f"x_q must be int8, got {x_q.dtype}")
    if x_q.shape[-1] != in_features:
        raise ValueError(f"x_q has {x_q.shape[-1]} features, the weight expects {in_features}")
    x2 = x_q.reshape(-1, in_features)
    M = x2.shape[0]

    def make():
        return _packed_plan(M, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias,
                            x_q.device, config)

    launch = make() if config else _PLANS.get(weight_packed, (weight_scale, weight_zero_point, bias),
                                              (bits, group_size, in_features), (M,), make)
    N = weight_packed.shape[0]
    y = _output(x_q.shape[:-1], N, out_dtype, x_q.device, out)
    if M == 0 or N == 0:
        return y
    launch(x2, x_scale.reshape(-1).contiguous(), y.view(M, N), weight_packed)
    return y
