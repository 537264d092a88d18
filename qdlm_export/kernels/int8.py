"""Integer-activation GEMMs (W8A8, W4A4): the ops, their backends, the torch ones and the conventions.

The ops (:func:`quantize_per_token`, :func:`int8_gemm`, :func:`packed_int_linear` and their
compositions :func:`w8a8_linear`, :func:`w4a4_linear`) and their backends (Triton ``int8_triton.py``,
the torch functions below) are registered at the end of this module.

Per-token dynamic activation quantization (symmetric)::

    quantize_per_token_torch(x, bits=8, clip_ratio=1.0) -> (x_q, x_scale)
        x [..., K] float  ->  x_q int8 [..., K] in [-qmax, qmax],  x_scale float32 [..., 1]
        qmax = 2**(bits-1) - 1 (127 for 8 bits, 7 for 4 bits: "int4 held in int8")
        x_scale = (max|x| * clip_ratio) / qmax over the row;  x_q = round(x * (1 / x_scale))
        These are the float32 operations of ``activations.activation_codes`` (the loader's fake
        quantizer), in the same order, with IEEE divisions; rounding is half away from zero
        (floor(|v| + 0.5) with the sign put back). Every backend does exactly these operations, so
        the codes agree bit for bit. An all-zero row gets x_scale = 0 and x_q = 0.

int8 x int8 GEMM with per-token and per-channel scales::

    int8_gemm_torch(a_q, a_scale, b_q, b_scale, bias=None, out_dtype=torch.bfloat16) -> [..., N]
        a_q int8 [..., K], a_scale float [..., 1] (or [...]), b_q int8 [N, K], b_scale float [N]
        (or [N, 1]), bias [N] or None:   y = (a_q @ b_q.T) * a_scale * b_scale.T + bias
        The int32 product uses ``torch._int_mm`` where it applies (CPU: any shape; CUDA: K and N
        multiples of 8, M > 16 -- smaller M is padded to 17 rows); otherwise an exact float64 matmul.

Integer activations times *packed* weights (the W4A4 path; also W8A8 on 8-bit symmetric weights)::

    packed_int_linear_torch(x_q, x_scale, weight_packed, weight_scale, weight_zero_point, bits,
                            group_size, in_features, bias=None, out_dtype=torch.bfloat16)
        The weight is the project's packed format (see ``weight_only.py``); ``q - z`` fits int8 for
        2/3/4 bits and for symmetric 8 bits. Per-channel weights (group_size -1) go through the int8
        GEMM; grouped weights need one scale per (group, channel) inside the K sum, which eager torch
        cannot do on integer tensor cores, so they dequantize both sides to float32 and matmul.
        This is the op a loaded W8A8 or W4A4 checkpoint runs (the loader's ``QdlmLinear``), so its
        fast backends take the packed codes as they are: 8-bit codes are bytes, ``q - 128`` is the
        byte with its top bit flipped.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._triton import triton_unavailable_reason
from .registry import Problem, choose, on_cuda, register_backend, register_steps
from .weight_only import cpu_row_blocks, dequantize_packed, int_row_blocks, unpack_codes, weight_row_blocks

INT_ACT_BITS = (4, 8)


def qmax_for(bits: int) -> int:
    if bits not in INT_ACT_BITS:
        raise ValueError(f"activation bits must be one of {INT_ACT_BITS}, got {bits}")
    return (1 << (bits - 1)) - 1


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (the convention every backend here shares)."""
    return torch.floor(v.abs() + 0.5).copysign(v)


# On the CPU, rows are quantized in chunks of about this many elements: the float32 temporaries of a
# chunk (1 MiB) stay in cache and in malloc's heap. One pass over a [1024, 12288] activation
# allocated ~50 MB per temporary, each mmapped and page-faulted anew: 266 ms against 27 ms chunked
# (1 thread, docs/benchmarks.md). Rows are independent, so the codes are the same bit for bit.
CPU_QUANT_CHUNK_ELEMENTS = 1 << 18


def quantize_per_token_torch(
    x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of ``x [..., K]`` to int8 codes in ``[-qmax, qmax]``."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    chunk = max(1, CPU_QUANT_CHUNK_ELEMENTS // max(K, 1))
    if x.device.type != "cpu" or rows <= chunk:
        return _quantize_rows(x, bits, clip_ratio)
    x2 = x.reshape(rows, K)
    q = torch.empty(rows, K, dtype=torch.int8)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    for start in range(0, rows, chunk):
        q[start : start + chunk], scale[start : start + chunk] = _quantize_rows(x2[start : start + chunk], bits, clip_ratio)
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def _quantize_rows(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = qmax_for(bits)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else xf.new_zeros(*x.shape[:-1], 1)
    # Tensor / tensor divisions: IEEE on every device (torch turns division by a Python scalar
    # into a reciprocal multiply on CUDA, which the Triton kernel would not reproduce).
    scale = (amax * clip_ratio).div_(torch.full_like(amax, float(qmax)))
    inv = torch.where(scale > 0, torch.ones_like(scale).div_(scale), torch.zeros_like(scale))
    q = round_half_away(xf * inv).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b_t [K, N] int8 -> int32 [M, N]``, exact, with ``torch._int_mm`` when it applies."""
    M, K = a.shape
    N = b_t.shape[1]
    if a.device.type == "cpu":
        return torch._int_mm(a, b_t)
    if a.device.type == "cuda" and K % 8 == 0 and N % 8 == 0 and K > 0 and N > 0:
        if M > 16:
            return torch._int_mm(a, b_t)
        # cuBLASLt's int8 path wants more than 16 rows: pad with zero rows and slice them off.
        return torch._int_mm(F.pad(a, (0, 0, 0, 17 - M)), b_t)[:M]
    # Other devices and odd shapes: float64 holds every int32 partial sum exactly.
    return (a.double() @ b_t.double()).to(torch.int32)


def _scale_epilogue(
    acc: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    y = acc.float()
    y.mul_(a_scale.reshape(-1, 1).float()).mul_(b_scale.reshape(1, -1).float())
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype)


def int8_gemm_torch(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``(a_q @ b_q.T) * a_scale * b_scale.T + bias`` with an exact int32 product (see module doc)."""
    if a_q.dtype != torch.int8 or b_q.dtype != torch.int8:
        raise ValueError(f"int8_gemm expects int8 operands, got {a_q.dtype} and {b_q.dtype}")
    lead = a_q.shape[:-1]
    a2 = a_q.reshape(-1, a_q.shape[-1])
    acc = int_mm(a2, b_q.t())
    return _scale_epilogue(acc, a_scale, b_scale, bias, out_dtype).view(*lead, b_q.shape[0])


def int_weight_codes(
    weight_packed: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signed weight integers ``q - z`` as int8 ``[out, in]`` (only where they fit int8). ``out``: a
    uint8 buffer of at least the weight's rows, reused for symmetric weights."""
    if bits == 8 and weight_zero_point is not None:
        raise ValueError("asymmetric 8-bit weights give q - z outside int8")
    if weight_zero_point is None:
        # Symmetric: q - 2**(bits-1) in uint8, whose wrap-around *is* the int8 two's complement
        # (no widening to int16 and back: about 3x faster at 4 bits).
        codes = unpack_codes(weight_packed, bits, in_features)
        target = None if out is None else out[: codes.shape[0], : codes.shape[1]]
        return torch.sub(codes, 1 << (bits - 1), out=target).view(torch.int8)
    codes = unpack_codes(weight_packed, bits, in_features).to(torch.int16)
    out = codes.shape[0]
    group = in_features if group_size == -1 else group_size
    if weight_zero_point is None:
        codes -= 1 << (bits - 1)
    else:
        codes = codes.view(out, in_features // group, group) - weight_zero_point.to(torch.int16).unsqueeze(-1)
    return codes.view(out, in_features).to(torch.int8)


def packed_int_linear_torch(
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
) -> torch.Tensor:
    """Integer activations (``x_q`` int8, per-token ``x_scale``) times a packed quantized weight."""
    if x_q.dtype != torch.int8:
        raise ValueError(f"x_q must be int8, got {x_q.dtype}")
    n_out = weight_packed.shape[0]
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, in_features)
    per_channel = group_size == -1 or group_size == in_features
    if per_channel and not (bits == 8 and weight_zero_point is not None):
        y = torch.empty(x2.shape[0], n_out, dtype=out_dtype, device=x2.device)
        blocks = int_row_blocks(n_out, in_features, x2.device)
        symmetric = weight_zero_point is None  # the one case that fills a reused buffer
        scratch = torch.empty(blocks[0].stop, in_features, dtype=torch.uint8, device=x2.device) if symmetric else None
        for rows, packed, scale, zero in weight_row_blocks(weight_packed, weight_scale, weight_zero_point, blocks):
            w = int_weight_codes(packed, zero, bits, group_size, in_features, out=scratch)
            b = None if bias is None else bias[rows]
            y[:, rows] = _scale_epilogue(int_mm(x2, w.t()), x_scale, scale, b, out_dtype)
    else:
        xf = x2.float().mul_(x_scale.reshape(-1, 1).float())
        y = torch.empty(x2.shape[0], n_out, dtype=out_dtype, device=x2.device)
        blocks = cpu_row_blocks(n_out, in_features, x2.device)  # one block off the CPU
        for rows, packed, scale, zero in weight_row_blocks(weight_packed, weight_scale, weight_zero_point, blocks):
            w = dequantize_packed(packed, scale, zero, bits, group_size, in_features, torch.float32)
            y[:, rows] = F.linear(xf, w, None if bias is None else bias[rows].float())
    return y.view(*lead, n_out)


# Limits of the Triton kernels (int8_triton.py), kept here so that checking them never imports triton.


def triton_packed_unsupported_reason(
    *, bits: int, group_size: int, in_features: int, symmetric: bool = True, **_: object
) -> str | None:
    """None when the Triton packed-weight integer GEMM takes this problem, else why not."""
    if bits not in (2, 3, 4, 8):
        return f"{bits}-bit weights are not supported"
    if bits == 8 and not symmetric:
        return "asymmetric 8-bit weights give q - z outside int8"
    if group_size != -1 and group_size % 32:
        return f"group_size {group_size} is not a multiple of 32 (int8 MMAs step K by 32)"
    if group_size != -1 and in_features % group_size:
        return f"in_features {in_features} is not a multiple of group_size {group_size}"
    return None


# ---------------------------------------------------------------------------------------------
# The ops and their backends (highest priority first; `auto` takes the first that can run):
#   quantize_per_token  triton (CUDA) > cpu_native (CPU, bf16 or float32 rows) > torch
#   int8_gemm           cpu_amx (CPU with AMX) > torch._int_mm (where it applies natively;
#                       on CUDA auto only without Triton)
#                       > triton (CUDA) > torch (padded/float64)
#   packed_int_linear   cpu_amx (CPU with AMX; per channel, 4 bits or 8 bits symmetric) > cpu_vnni (the
#   (what loaded W8A8     same, CPU with AVX512-VNNI; auto up to 128 or 256 tokens) > triton (CUDA; 8 bits
#    and W4A4 models      symmetric per channel on the int8 GEMM kernel, reading the codes themselves;
#    run)                 else the unpack-per-tile kernel) > torch
# The Triton module is imported on first use (see _triton.py).
# ---------------------------------------------------------------------------------------------


@functools.cache
def _triton_ops() -> dict:
    """The Triton launchers, imported on first use (``_triton.py``), then held: an import statement per
    call costs about a microsecond, which a small GEMM on a GPU does not have to spare."""
    from .int8_triton import int8_gemm_triton, packed_int_linear_triton, quantize_per_token_triton

    return {"quantize_per_token_triton": quantize_per_token_triton, "int8_gemm_triton": int8_gemm_triton,
            "packed_int_linear_triton": packed_int_linear_triton}


def _quantize_triton_unsupported(p: Problem) -> str | None:
    bits = 8 if p.bits is None else p.bits
    return triton_unavailable_reason(p.device) or (None if bits in INT_ACT_BITS else f"{bits}-bit activations")


def _quantize_per_token_triton(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_ops()["quantize_per_token_triton"](*args, **kwargs)


def _int_mm_native_unsupported(p: Problem) -> str | None:
    if p.device.type == "cpu":
        return None
    if p.device.type != "cuda":
        return f"torch._int_mm does not run on {p.device.type}"
    if (p.K is not None and p.K % 8) or (p.N is not None and p.N % 8):
        return "torch._int_mm on CUDA needs K and N multiples of 8"
    if p.M is not None and p.M <= 16:
        return "torch._int_mm on CUDA needs more than 16 rows"
    return None


def _int_mm_auto(p: Problem) -> bool:
    """On CUDA, auto leaves torch._int_mm to machines without Triton: on an H200 (2026-12-04, bench
    --full) the Triton int8 GEMM ran 2.5-3.5x faster than torch._int_mm at M = 256..4096 on all four
    dLLM shapes. On CPU, torch._int_mm is the integer path there is."""
    return p.device.type != "cuda" or triton_unavailable_reason(p.device) is not None


def _int8_gemm_triton(*args: object, **kwargs: object) -> torch.Tensor:
    return _triton_ops()["int8_gemm_triton"](*args, **kwargs)


def _packed_triton_unsupported(p: Problem) -> str | None:
    return triton_unavailable_reason(p.device) or triton_packed_unsupported_reason(
        bits=p.bits, group_size=p.group_size, in_features=p.K, symmetric=p.symmetric is not False
    )


def _packed_int_linear_triton(*args: object, **kwargs: object) -> torch.Tensor:
    return _triton_ops()["packed_int_linear_triton"](*args, **kwargs)


register_backend(
    "quantize_per_token", "triton", _quantize_per_token_triton, family="triton", priority=20,
    unsupported=_quantize_triton_unsupported, auto=on_cuda, summary="fused per-token absmax + round",
)
def _quantize_cpu_native_unsupported(p: Problem) -> str | None:
    from .cpu_int8 import quantize_unsupported_reason

    return quantize_unsupported_reason(dtype=p.dtype, device=p.device)


def _quantize_per_token_cpu_native(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    from .cpu_int8 import quantize_rows

    return quantize_rows(*args, **kwargs)


register_backend(
    "quantize_per_token", "cpu_native", _quantize_per_token_cpu_native, family="cpu_native", priority=10,
    unsupported=_quantize_cpu_native_unsupported, summary="per-token absmax + round of bf16 or float32 rows (C, AVX-512)",
)
register_backend(
    "quantize_per_token", "torch", quantize_per_token_torch, family="torch", priority=0,
    summary="per-token absmax + round",
)
register_backend(
    "int8_gemm", "torch._int_mm", int8_gemm_torch, family="torch", priority=30,
    unsupported=_int_mm_native_unsupported, auto=_int_mm_auto, summary="torch._int_mm, then scales",
)
def _cpu_amx_unsupported(p: Problem) -> str | None:
    from .cpu_int8 import unsupported_reason

    return unsupported_reason(M=p.M, K=p.K, N=p.N, device=p.device)


def _int8_gemm_cpu_amx(*args: object, **kwargs: object) -> torch.Tensor:
    from .cpu_int8 import int8_gemm_amx

    return int8_gemm_amx(*args, **kwargs)


# The AMX GEMM beats torch._int_mm at every token count on a Xeon with AMX (1 thread, with the
# activation quantization, weights cold as in a model, time / dense bf16: 0.57-0.58 vs 0.86-1.00 at
# M = 1-16, 0.55 vs 0.67-0.76 at M = 256; docs/benchmarks.md).
register_backend(
    "int8_gemm", "cpu_amx", _int8_gemm_cpu_amx, family="cpu_native", priority=35,
    unsupported=_cpu_amx_unsupported,
    summary="int8 tiles of Intel AMX (C), the weight laid out per call",
)
register_backend(
    "int8_gemm", "triton", _int8_gemm_triton, family="triton", priority=20,
    unsupported=lambda p: triton_unavailable_reason(p.device), auto=on_cuda,
    summary="int8 MMA with fused scale epilogue",
)
register_backend(
    "int8_gemm", "torch", int8_gemm_torch, family="torch", priority=0,
    summary="torch._int_mm on padded rows, else exact float64 matmul",
)
register_backend(
    "packed_int_linear", "triton", _packed_int_linear_triton, family="triton", priority=20,
    unsupported=_packed_triton_unsupported, auto=on_cuda,
    summary="packed weight unpacked to int8 in-kernel + int8 MMA",
)
def _packed_cpu_amx_unsupported(p: Problem) -> str | None:
    from .cpu_int8 import packed_unsupported_reason

    return packed_unsupported_reason(bits=p.bits, group_size=p.group_size, K=p.K, N=p.N, symmetric=p.symmetric,
                                     device=p.device)


def _packed_int_linear_cpu_amx(*args: object, **kwargs: object) -> torch.Tensor:
    from .cpu_int8 import packed_int_linear_amx

    return packed_int_linear_amx(*args, **kwargs)


register_backend(
    "packed_int_linear", "cpu_amx", _packed_int_linear_cpu_amx, family="cpu_native", priority=35,
    unsupported=_packed_cpu_amx_unsupported,
    summary="per channel, 4 bits or 8 bits symmetric: codes to int8 on the way into Intel AMX int8 tiles (C)",
)
def _packed_cpu_vnni_unsupported(p: Problem) -> str | None:
    from .cpu_int8 import vnni_unsupported_reason

    return vnni_unsupported_reason(bits=p.bits, group_size=p.group_size, K=p.K, symmetric=p.symmetric, device=p.device)


def _packed_int_linear_cpu_vnni(*args: object, **kwargs: object) -> torch.Tensor:
    from .cpu_int8 import packed_int_linear_vnni

    return packed_int_linear_vnni(*args, **kwargs)


# Without AMX, up to the token count where it stops winning. AMD EPYC Zen 5, cold weights, with the
# activation quantization, time / dense bf16 at 4096 x 4096 (12288 x 4096), against the torch path's:
# W8A8 0.41 (0.40) / 0.49 (0.51) at M = 1, 0.58 (0.63) / 1.57 (1.45) at 16, 0.65 (0.77) / 0.76 (0.81)
# at 128, 0.66 (0.83) / 0.66 (0.70) at 256; W4A4 0.36 (0.29) / 4.07 (3.73) at 1, 0.53 (0.44) / 3.97
# (3.67) at 16, 0.67 (0.70) / 1.06 (1.07) at 256, 0.64 (0.77) / 0.64 (0.71) at 1024.
register_backend(
    "packed_int_linear", "cpu_vnni", _packed_int_linear_cpu_vnni, family="cpu_native", priority=34,
    unsupported=_packed_cpu_vnni_unsupported, auto=lambda p: p.M is not None and p.M <= (256 if p.bits == 4 else 128),
    summary="per channel, 4 bits or 8 bits symmetric: the stored codes times int8 activations (C, AVX512-VNNI)",
)
register_backend(
    "packed_int_linear", "torch", packed_int_linear_torch, family="torch", priority=0,
    summary="torch._int_mm on unpacked int8 weights if per channel, else dequantize + matmul",
)
register_steps("w8a8_linear", "quantize_per_token", "int8_gemm", act_bits=8)
register_steps("w4a4_linear", "quantize_per_token", "packed_int_linear", act_bits=4)


def quantize_per_token(
    x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8 (or int4-in-int8) quantization: ``(x_q [..., K], x_scale [..., 1])``,
    bit-identical to ``core.activations.activation_codes`` (dynamic, symmetric); see the module doc."""
    K = x.shape[-1]
    b = choose("quantize_per_token", x.device, backend, M=x.numel() // max(K, 1), K=K, bits=bits, dtype=x.dtype)
    return b.impl(x, bits, clip_ratio)


def int8_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``(a_q @ b_q.T) * a_scale * b_scale.T + bias`` (int8 operands, exact int32 accumulation)."""
    K = a_q.shape[-1]
    b = choose("int8_gemm", a_q.device, backend, M=a_q.numel() // max(K, 1), K=K, N=b_q.shape[0], dtype=out_dtype)
    return b.impl(a_q, a_scale, b_q, b_scale, bias, out_dtype)


def packed_int_linear(
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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """int8 activations (per-token scales) times a packed quantized weight; see the module doc."""
    b = choose(
        "packed_int_linear",
        x_q.device,
        backend,
        M=x_q.numel() // max(in_features, 1),
        K=in_features,
        N=weight_packed.shape[0],
        bits=bits,
        group_size=group_size,
        symmetric=weight_zero_point is None,
        dtype=out_dtype,
    )
    return b.impl(
        x_q, x_scale, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias, out_dtype
    )


def w8a8_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    clip_ratio: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """W8A8: quantize ``x`` per token to int8, then the int8 GEMM against ``weight_q`` (int8
    ``[out, in]``, per-channel ``weight_scale [out]``). Returns ``x.dtype``."""
    x_q, x_scale = quantize_per_token(x, 8, clip_ratio, backend=backend)
    return int8_gemm(x_q, x_scale, weight_q, weight_scale, bias, x.dtype, backend=backend)


def w4a4_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 4,
    act_bits: int = 4,
    clip_ratio: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """W4A4 (or WxA8 with ``act_bits=8``): per-token quantize ``x`` to ``act_bits`` held in int8, then
    multiply by the packed ``bits``-bit weight on int8 MMAs. Returns ``x.dtype``. (Rotate ``x`` with
    :func:`qdlm_export.kernels.hadamard_transform` first if the weights were quantized in a rotated basis.)"""
    x_q, x_scale = quantize_per_token(x, act_bits, clip_ratio, backend=backend)
    return packed_int_linear(
        x_q, x_scale, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias, x.dtype,
        backend=backend,
    )
