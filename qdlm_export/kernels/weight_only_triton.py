"""Weight-only quantized linear, Triton backend: a grouped dequantize-GEMM on the packed weight.

``y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] + bias[n]`` with ``g = k // group_size``,
read straight from the packed int32 layout of :mod:`qdlm_export.core.packing`. Same arguments as
:func:`qdlm_export.kernels.weight_only.weight_only_linear_torch`, plus ``out=``.

Supported (``weight_only.triton_unsupported_reason`` says why not): bits 2/3/4/8, symmetric or
asymmetric, ``group_size`` -1 or a multiple of 16 dividing ``in_features``, any ``M`` / ``N`` / ``K``
(tails are masked; with ``group_size == -1`` any ``K``), fp16 / bf16 / fp32 activations, scales in
any float dtype.

How a tile is computed (one program = one ``[BLOCK_M, BLOCK_N]`` block of ``y``):

* ``BLOCK_K`` divides ``group_size``, so each K step lies inside one quantization group: the step
  dequantizes its ``[BLOCK_N, BLOCK_K]`` weight tile with that group's scale into the activation
  dtype (as the torch backend's dequantized weight) and accumulates ``x @ tile.T`` in fp32, in place.
  Per-channel weights (one group) multiply ``x`` by the *integer* matrix ``q - z`` (exact in
  fp16/bf16 since ``|q - z| <= 255``) and scale the accumulator once at the end.
* ``DEQUANT_IN_X`` (set by the launcher: bf16/fp16 activations, codes of at most 4 bits, scales of
  the activations' dtype or per channel): the tile is dequantized in the 16-bit dtype itself,
  ``((base + q) - (base + z)) * s`` with ``base + q`` made by one OR into the mantissa of ``base``
  (see ``OFFSET_CODES`` below). The difference is a small exact integer and the product is rounded
  once, so the tile is the float32 path's bit for bit, without its int-to-float conversions and two
  elements an instruction. SASS of one K step on sm_90: 452 -> 291 instructions a warp at
  128 x 128 x 64 (the unpack below included), 390 -> 304 at 16 x 32 x 128.
* Scales and zero points are read group-major (``layouts.group_major_qparams``), so Triton's
  pipeliner copies them ahead of the K loop with the codes and activations.
* Code ``k`` of a row sits at stream bit ``k * bits``: word ``(k * bits) // 32``, shift
  ``(k * bits) % 32``. For 2/4/8 bits the code is whole inside that word, and a tile is read as whole
  words along each row, then split in the thread that holds the word (``unpack_triton.py``). For 3 bits, 32 codes fill 3 words, read as word triples; codes
  at shifts 30 and 31 continue at bit 0 of the next word, ORed in shifted up by ``32 - shift``.
  Words are read as uint32 so that ``>>`` is a logical shift.
* ``OFFSET_CODES`` (bf16/fp16 activations, up to 4 bits) skips the per-weight dequantization: the
  codes become the exact floats ``base + q`` by one OR into the mantissa of ``base`` (128 in bf16,
  1024 in fp16), the MMA takes them unscaled, and each group's partial sum is corrected and scaled on
  the accumulator, ``(x . (base + q) - (base + z) * sum(x)) * s``, with ``sum(x)`` from a small MMA.
  The default path converts every weight element int -> fp32 -> scaled -> activation dtype, and GPU
  conversions run at a fraction of the arithmetic rate: the suspected reason the fused kernel ran at
  0.2x dense at 1024 tokens on an H200, which the tile sweep's OFFSET_CODES candidates test. The
  trade: with groups, each K step's MMA starts afresh and its ``BLOCK_M x BLOCK_N`` correction runs
  on the CUDA cores, which at 128 x 128 tiles costs about what the conversions did; per channel the
  MMA accumulates in place. The weight is never rounded to the activation dtype (closer to the
  float64 product).
* ``SWAP_AB`` computes the transposed tile, ``tile @ x.T``: the dequantized weight becomes the MMA's
  first operand. On Hopper that operand of ``wgmma`` may come from registers, where the dequantized
  tile already is, while the second must sit in shared memory (so the default order stores every
  dequantized tile there first); and the MMA's M side is at least 64 rows, which a 16-token ``x``
  fills only a quarter of, while its N side (the tokens, once swapped) may be as narrow as 16
  (``tl.dot``'s minimum).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton import cdiv, cuda_arch, datacenter_hopper_or_blackwell, dot_upcast
from .tuned import tile_config
from .unpack_triton import unpack_code_rows
from .layouts import LaunchPlans, group_major_qparams
from .weight_only import scale_groups, triton_block_k, triton_unsupported_reason


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row/column offsets of this program's output tile.

    Programs are numbered so that GROUP_M consecutive row-blocks walk the column-blocks together:
    they reuse the same weight tiles while those are still in L2.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_here
    pid_n = (pid % per_group) // rows_here
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _mma(x, w, acc, SWAP_AB: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + x @ w.T`` (``[BLOCK_M, BLOCK_N]``), or with SWAP_AB its transpose ``acc + w @ x.T``.

    Constexpr branches that return have an ``else``: the compiler, unlike the interpreter, goes on past
    a taken ``return`` (``tests/kernels/test_triton_gpu_compile.py``)."""
    if SWAP_AB:
        return tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    else:
        return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _per_column(v, SWAP_AB: tl.constexpr):
    """A per-output-column vector, broadcast against the accumulator's orientation."""
    if SWAP_AB:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _per_token(v, SWAP_AB: tl.constexpr):
    """A per-token vector, broadcast against the accumulator's orientation."""
    if SWAP_AB:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def zero_points(z_ptr, offsets, ok, HAS_ZERO: tl.constexpr, BITS: tl.constexpr):
    """int32 zero points at ``z_ptr + offsets`` (one per output row), or the symmetric midpoint."""
    if HAS_ZERO:
        return tl.load(z_ptr + offsets, mask=ok, other=0).to(tl.int32)
    else:
        return offsets * 0 + (1 << (BITS - 1))


@triton.jit
def _token_sums(x, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """``sum_k x[m, k]`` in fp32 by an MMA with a ``[BLOCK_K, 16]`` selector (ones in column 0): no
    per-element conversion of ``x`` on the CUDA cores."""
    j = tl.arange(0, 16)
    sel = ((tl.arange(0, BLOCK_K)[:, None] * 0 + j[None, :]) == 0).to(x.dtype)
    return tl.sum(tl.dot(x, sel, input_precision=PRECISION), axis=1)


# OFFSET_CODES and DEQUANT_IN_X: a float whose ulp is 1 and the bit pattern it has, per activation
# dtype; ORing a code q < 128 (bf16) or < 1024 (fp16) into its mantissa gives the exact float base + q.
OFFSET_CODE_FLOATS = {torch.bfloat16: (128, 0x4300), torch.float16: (1024, 0x6400)}


@triton.jit
def dequantize_tile(x, q, z, s, PER_CHANNEL: tl.constexpr, UPCAST: tl.constexpr, DEQUANT_IN_X: tl.constexpr,
                    CODE_BASE: tl.constexpr, CODE_BITS: tl.constexpr):
    """A K step's weight tile in x's dtype for the MMA, and ``x`` (float32 where the interpreter needs
    it): ``(q - z) * s`` with the group's scale ``s`` (float32, ``[BLOCK_N]``), or per channel the
    integers ``q - z`` (the scale goes on the accumulator at the end).

    DEQUANT_IN_X (bf16/fp16 activations, codes of at most 4 bits, ``s`` exact in x's dtype): computed
    in the 16-bit dtype as ``((base + q) - (base + z)) * s``, where ``base + q`` is one OR into the
    mantissa of ``base``. The difference is a small exact integer and the product is rounded once, so
    the tile is the float32 path's bit for bit, without its int-to-float conversions, two elements an
    instruction. Otherwise: int -> float32, times the scale, rounded to x's dtype (as the torch
    backend's dequantized weight)."""
    if DEQUANT_IN_X:
        v = (q | CODE_BITS).to(tl.int16).to(x.dtype, bitcast=True)
        if UPCAST:  # the interpreter computes bf16 as raw bits: the same values in float32
            x = x.to(tl.float32)
            v = v.to(tl.float32)
        w = v - (z + CODE_BASE).to(v.dtype)[:, None]
        if not PER_CHANNEL:
            w = w * s.to(v.dtype)[:, None]
    else:
        w = q - z[:, None]
        if UPCAST:
            x = x.to(tl.float32)
        if PER_CHANNEL:
            w = w.to(x.dtype)  # small integers: exact in every float dtype
        else:
            w = (w.to(tl.float32) * s[:, None]).to(x.dtype)
    return x, w


def dequantizes_in_x(x_dtype: torch.dtype, bits: int, scale_dtype: torch.dtype, groups: int) -> bool:
    """Whether ``dequantize_tile`` may compute in the activations' 16-bit dtype (exactly as float32)."""
    return x_dtype in OFFSET_CODE_FLOATS and bits <= 4 and (groups == 1 or scale_dtype == x_dtype)


@triton.jit
def _wo_gemm_kernel(
    x_ptr,
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
    stride_ys,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    CODE_BASE: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    OFFSET_CODES: tl.constexpr,
    DEQUANT_IN_X: tl.constexpr,
):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    split = tl.program_id(1)  # SPLIT_K > 1: this program sums every SPLIT_K-th K step into its own slice
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_total = tl.zeros((BLOCK_M,), dtype=tl.float32)  # OFFSET_CODES per channel: sum of x over K
    for k0 in range(split * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (k[None, :] < K),
            other=0.0,
        )
        q = unpack_code_rows(wp_ptr, stride_wn, k0, offs_n, K, N, BITS, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        g = k0 // group_size  # the one group this K step lies in (0 when per channel)
        z = zero_points(z_ptr, offs_n * stride_zn + g * stride_zg, n_ok, HAS_ZERO, BITS)
        if OFFSET_CODES:
            # The codes as the exact floats CODE_BASE + q (q ORed into the mantissa of CODE_BASE: no
            # int-to-float conversion); the MMA multiplies them unscaled, and the zero point becomes
            # (CODE_BASE + z) * sum_k x, subtracted per group before the group's scale.
            w = (q | CODE_BITS).to(tl.int16).to(x.dtype, bitcast=True)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            xs = _token_sums(x, BLOCK_K, PRECISION)
            if PER_CHANNEL:
                acc = _mma(x, w, acc, SWAP_AB, PRECISION)
                x_total += xs
            else:
                zb = (z + CODE_BASE).to(tl.float32)
                s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
                part = _mma(x, w, None, SWAP_AB, PRECISION)
                acc += (part - _per_token(xs, SWAP_AB) * _per_column(zb, SWAP_AB)) * _per_column(s, SWAP_AB)
        else:
            if PER_CHANNEL:
                s = z  # unused: per channel, the scale multiplies the accumulator once at the end
            else:
                s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
            x, w = dequantize_tile(x, q, z, s, PER_CHANNEL, UPCAST, DEQUANT_IN_X, CODE_BASE, CODE_BITS)
            acc = _mma(x, w, acc, SWAP_AB, PRECISION)
    if PER_CHANNEL:
        if OFFSET_CODES:
            zb = (zero_points(z_ptr, offs_n * stride_zn, n_ok, HAS_ZERO, BITS) + CODE_BASE).to(tl.float32)
            acc -= _per_token(x_total, SWAP_AB) * _per_column(zb, SWAP_AB)
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * _per_column(s, SWAP_AB)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(split == 0, bias, 0.0)  # added by one slice only
        acc += _per_column(bias, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)
    tl.store(
        y_ptr + split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & n_ok[None, :],
    )


def unit_stride_rows(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor with unit stride along its last dim (the kernels index rows by stride(0) only)."""
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors]


def pick_config(M: int, N: int, group_size: int, in_features: int, device: torch.device | None = None) -> dict:
    """Tile sizes by problem size (heuristic, not autotuned).

    Small M (diffusion steps over short blocks, decoding) is bound by reading the weight: narrow
    output tiles give enough programs to cover the GPU. Large M is bound by the MMAs and the
    in-loop dequantization: large tiles. The sizes at M <= 16, M <= 256 and above are the fastest
    candidates of ``benchmarks/triton_sweep.py`` on an H200 (2026-12-04; K x N = 4096 x 4096 and
    4096 x 12288), where 32-column tiles beat 64 by up to 1.3x at M = 16. Before Hopper and on sm_120
    (``device``: the current CUDA device when None) the two larger tiles spill 0.3-1.3 KB a thread
    (``benchmarks/triton_compile_check.py``): there the K step halves (M 65-256) or 8 warps share
    the tile (above), spilling 0.25 KB at most. Unmeasured on such a GPU."""
    hopper = datacenter_hopper_or_blackwell(cuda_arch(device))
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)
    elif M <= 64:
        cfg = dict(BLOCK_M=32 if M <= 32 else 64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    elif M <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128 if hopper else 64, num_warps=4, num_stages=3)
    elif hopper:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    cfg["BLOCK_K"] = triton_block_k(group_size, cap=cfg["BLOCK_K"]) or 16
    cfg["GROUP_M"] = 8
    cfg["SPLIT_K"] = 1  # > 1 only from the tile sweep so far (benchmarks/triton_sweep.py)
    cfg["SWAP_AB"] = False  # True only from the tile sweep so far
    cfg["OFFSET_CODES"] = False  # likewise
    return cfg


def launch_config(M: int, N: int, group_size: int, in_features: int, bits: int, x: torch.Tensor) -> dict:
    """A call's tile configuration: the one measured fastest for its shape on this GPU model
    (``tuned.py``; the sweep times grouped 4-bit codes with 16-bit activations, so only those use it),
    with its K step fitted to the group size; else :func:`pick_config`'s."""
    cfg = tile_config("weight_only", M, N, in_features, x.device) if (
        bits == 4 and group_size != -1 and x.dtype in OFFSET_CODE_FLOATS) else None
    if cfg is None:
        return pick_config(M, N, group_size, in_features, x.device)
    cfg["BLOCK_K"] = triton_block_k(group_size, cap=cfg["BLOCK_K"]) or 16
    return cfg


class _LaunchPlan(NamedTuple):
    """What one launch needs besides the activations, the packed weight and the output (made once per
    weight, token count and activation dtype). It holds neither the packed weight nor a view of it: it
    is held beside that tensor, and would otherwise keep it alive for good."""

    grid: tuple[int, int]
    split_k: int
    qparams: tuple  # scale, zero (or scale), bias (or scale): the kernel's pointer arguments after the weight
    sizes: tuple  # M, N, K, group_size
    qparam_strides: tuple  # stride_sn, stride_sg, stride_zn, stride_zg
    constexprs: dict


_PLANS = LaunchPlans()


def _make_plan(x2: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
               weight_zero_point: torch.Tensor | None, bits: int, group_size: int, in_features: int,
               bias: torch.Tensor | None, config: dict | None) -> _LaunchPlan:
    reason = triton_unsupported_reason(bits=bits, group_size=group_size, in_features=in_features, dtype=x2.dtype)
    if reason:
        raise ValueError(f"triton weight-only GEMM: {reason}")
    M, n_out = x2.shape[0], weight_packed.shape[0]
    groups = scale_groups(weight_scale, n_out, group_size, in_features)
    scale, zero = group_major_qparams(weight_packed, weight_scale, weight_zero_point)  # read ahead of the K loop
    cfg = dict(config) if config else launch_config(M, n_out, group_size, in_features, bits, x2)  # config: tuning only
    cfg.setdefault("SPLIT_K", 1)
    cfg.setdefault("SWAP_AB", False)
    cfg.setdefault("OFFSET_CODES", False)
    code_base, code_bits = OFFSET_CODE_FLOATS.get(x2.dtype, (0, 0))
    if cfg["OFFSET_CODES"] and (not code_bits or bits > 4):
        raise ValueError(f"OFFSET_CODES needs bf16/fp16 activations and codes of at most 4 bits, not {x2.dtype}, {bits} bits")
    constexprs = dict(
        BITS=bits,
        HAS_ZERO=zero is not None,
        HAS_BIAS=bias is not None,
        PER_CHANNEL=groups == 1,
        UPCAST=dot_upcast(x2.dtype),
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        CODE_BASE=code_base,
        CODE_BITS=code_bits,
        DEQUANT_IN_X=dequantizes_in_x(x2.dtype, bits, weight_scale.dtype, groups),
        **cfg,
    )
    return _LaunchPlan(
        grid=(cdiv(M, cfg["BLOCK_M"]) * cdiv(n_out, cfg["BLOCK_N"]), cfg["SPLIT_K"]),
        split_k=cfg["SPLIT_K"],
        qparams=(scale, zero if zero is not None else scale, bias if bias is not None else scale),
        sizes=(M, n_out, in_features, in_features if group_size == -1 else group_size),
        qparam_strides=(scale.stride(0), scale.stride(1),
                        zero.stride(0) if zero is not None else 0, zero.stride(1) if zero is not None else 0),
        constexprs=constexprs,
    )


def weight_only_linear_triton(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton dequantize-GEMM. ``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype`` (or into ``out``).

    ``config`` (a tile configuration, for tuning) is used for this call only; without it the call runs
    the plan held beside the weight for its token count and dtype (``layouts.LaunchPlans``)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    x2 = x.reshape(-1, in_features)

    def make() -> _LaunchPlan:
        return _make_plan(x2, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias, config)

    plan = make() if config else _PLANS.get(weight_packed, (weight_scale, weight_zero_point, bias),
                                            (bits, group_size, in_features), (x2.shape[0], x2.dtype), make)
    M, n_out = plan.sizes[0], plan.sizes[1]
    lead = x.shape[:-1]
    y = out if out is not None else torch.empty(*lead, n_out, dtype=x.dtype, device=x.device)
    if out is not None and tuple(y.shape) != (*lead, n_out):
        raise ValueError(f"out has shape {tuple(y.shape)}, expected {(*lead, n_out)}")
    if M == 0 or n_out == 0:
        return y
    y2 = y.view(M, n_out)  # raises if `out` is not viewable as 2-D
    split_k = plan.split_k
    # Split K: each of the SPLIT_K programs of a tile writes a float32 partial sum, summed after
    # (more programs for few tokens, where one per output tile leaves most of the GPU idle).
    target = y2 if split_k == 1 else torch.empty(split_k, M, n_out, dtype=torch.float32, device=x.device)
    (wp,) = unit_stride_rows(weight_packed)  # the kernels index rows by stride(0) only
    _wo_gemm_kernel[plan.grid](
        x2, wp, *plan.qparams, target, *plan.sizes, x2.stride(0), x2.stride(1), wp.stride(0), *plan.qparam_strides,
        target.stride(-2), target.stride(-1), target.stride(0) if split_k > 1 else 0,
        **plan.constexprs,
    )
    if split_k > 1:
        y2.copy_(target.sum(dim=0))
    return y
