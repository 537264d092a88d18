"""Weight-only quantized linear: the op, its backends, and the torch one (dequantize, then one matmul).

    y = x @ W_hat.T + bias,   W_hat[n, k] = (q[n, k] - z[n, g]) * s[n, g],   g = k // group_size

``weight_packed`` is int32 ``[out, ceil(in*bits/32)]`` in the layout of
:mod:`qdlm_export.core.packing` (a dense little-endian bit stream per row). ``weight_scale`` is
``[out, groups]`` (fp16/bf16/fp32); ``weight_zero_point`` is uint8 ``[out, groups]`` or None for
symmetric weights (then ``z = 2**(bits-1)``). ``group_size == -1`` means one group per row.

:func:`weight_only_linear` is the op; its backends are registered at the end of this module: the
Triton kernel (``weight_only_triton.py``), the native AVX512-BF16 int4 kernel (``cpu_native.py``),
torch's packed CPU kernels (``cpu_packed.py``) and the
torch backend here, the fallback on every device for shapes the others do not take. It is
dequantize-then-matmul done with as few passes as eager torch allows: codes are read from the bytes
of the packed words (no index gathers, no int64 intermediates), the affine map runs in place on one
float32 scratch tensor, and the other temporaries are uint8 (plus one int32 per 8 codes for 3 bits).
``(q - z) * s`` is computed in float32 and cast once, so the weight is rounded exactly as
:func:`qdlm_export.core.schemes.dequantize` rounds it.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterator

import torch
import torch.nn.functional as F

from ..core.packing import SUPPORTED_BITS, packed_words, unpack_rows
from ._triton import triton_unavailable_reason
from .registry import Problem, choose, on_cuda, register_backend, register_preference
from .tuned import entry as measured_entry


def scale_groups(weight_scale: torch.Tensor, n_out: int, group_size: int, in_features: int) -> int:
    """The number of groups per row, after checking ``weight_scale`` is ``[n_out, groups]``."""
    groups = 1 if group_size == -1 else in_features // group_size
    if tuple(weight_scale.shape) != (n_out, groups):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected {(n_out, groups)}")
    return groups


def unpack_codes(weight_packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 ``[out, words]`` -> uint8 codes ``[out, in_features]`` (the values of ``unpack_rows``).

    On a little-endian host the packed bit stream *is* the byte sequence of the int32 words (stream
    bit ``t`` is bit ``t % 8`` of byte ``t // 8``), so we read bytes, never gather:

    * 8 bits: byte ``j`` is code ``j``;
    * 4 / 2 bits: byte ``j`` holds codes ``j*cpb ... j*cpb + cpb-1`` (``cpb = 8 // bits``) at bit
      offsets ``0, bits, 2*bits...``;
    * 3 bits: every 3 bytes (24 bits) hold exactly 8 codes at offsets ``0, 3, ..., 21``; a code may
      straddle a byte (or int32 word) boundary, so the 3 bytes are first joined into one int32.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if weight_packed.dim() != 2 or weight_packed.dtype != torch.int32:
        raise ValueError(f"weight_packed must be 2-D int32, got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    rows, n_words = weight_packed.shape
    if n_words != packed_words(in_features, bits):
        raise ValueError(
            f"packed weight has {n_words} words a row; {in_features} codes of {bits} bits need "
            f"{packed_words(in_features, bits)}"
        )
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        return unpack_rows(weight_packed, bits, in_features)
    b = weight_packed.contiguous().view(torch.uint8)  # [rows, 4 * n_words]
    if bits == 8:
        return b[:, :in_features]
    if bits == 3:
        n_bytes = b.shape[1]
        triples = -(-n_bytes // 3)
        if triples * 3 != n_bytes:
            b = F.pad(b, (0, triples * 3 - n_bytes))
        t = b.view(rows, triples, 3).to(torch.int32)
        v = t[..., 0] | (t[..., 1] << 8) | (t[..., 2] << 16)  # 24 stream bits = 8 codes
        codes = torch.stack([((v >> (3 * i)) & 7).to(torch.uint8) for i in range(8)], dim=-1)
    else:
        mask = (1 << bits) - 1
        codes = torch.stack([(b >> (bits * i)) & mask for i in range(8 // bits)], dim=-1)
    return codes.view(rows, -1)[:, :in_features]


def dequantize_packed(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed int32 ``[out, words]`` -> dense ``[out, in]`` weight ``(q - z) * s`` in ``dtype``.

    Computed in float32 and cast once, exactly like :func:`qdlm_export.core.schemes.dequantize`.
    """
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    out = weight_packed.shape[0]
    groups = in_features // group
    if tuple(weight_scale.shape) != (out, groups):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected {(out, groups)}")
    w = unpack_codes(weight_packed, bits, in_features).to(torch.float32).view(out, groups, group)
    if weight_zero_point is None:
        w.sub_(float(1 << (bits - 1)))
    else:
        w.sub_(weight_zero_point.to(torch.float32).unsqueeze(-1))
    w.mul_(weight_scale.to(torch.float32).unsqueeze(-1))
    return w.view(out, in_features).to(dtype)


def weight_only_linear_torch(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize to ``x.dtype``, then ``F.linear``. ``x`` is ``[..., in]``; returns ``[..., out]``.

    On the CPU a large weight is dequantized and multiplied in blocks of output rows (see
    :func:`cpu_row_blocks`); every output element is still one dot product over the whole input."""
    b = None if bias is None else bias.to(x.dtype)
    blocks = cpu_row_blocks(weight_packed.shape[0], in_features, x.device)
    if len(blocks) == 1:
        w = dequantize_packed(weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, x.dtype)
        return F.linear(x, w, b)
    x2 = x.reshape(-1, in_features)
    y = torch.empty(x2.shape[0], weight_packed.shape[0], dtype=x.dtype)
    for rows, packed, scale, zero in weight_row_blocks(weight_packed, weight_scale, weight_zero_point, blocks):
        w = dequantize_packed(packed, scale, zero, bits, group_size, in_features, x.dtype)
        y[:, rows] = F.linear(x2, w, None if b is None else b[rows])
    return y.view(*x.shape[:-1], weight_packed.shape[0])


# Dequantized weights are materialised at most this many elements at a time on the CPU (2 MiB in
# float32). A whole 4096 x 12288 weight in float32 is 200 MB, above glibc's mmap threshold, so every
# call mmapped fresh pages and faulted them in: slower, and its time swung with the machine's other
# jobs (docs/benchmarks.md). Blocks this size are reused from the heap, and the passes over one block
# stay in a core's L2: at 12288 x 4096, M = 16 (Xeon, 1 thread, five processes) 85-88 ms a call,
# against 92-105 ms with blocks of 2 M elements, whose passes went to the shared L3.
CPU_DEQUANT_BLOCK_ELEMENTS = 1 << 19


def cpu_row_blocks(out_features: int, in_features: int, device: torch.device) -> list[slice]:
    """Slices of output rows to dequantize one at a time: one slice off the CPU or for small weights."""
    if torch.device(device).type != "cpu" or out_features * in_features <= CPU_DEQUANT_BLOCK_ELEMENTS:
        return [slice(0, out_features)]
    return _row_slices(out_features, max(1, CPU_DEQUANT_BLOCK_ELEMENTS // max(in_features, 1)))


# The CPU integer path turns one block of weight rows into int8 at a time, into one reused buffer:
# torch._int_mm ran at full speed from 256 rows a call (at 42 rows, 12288 x 4096: 1.9x slower), and a
# fresh weight-sized buffer per call cost more than the GEMM's int8 copy itself (page faults; AMD
# EPYC, 2026-12-05: 19 ms of a 58 ms call at 256 tokens, 12288 x 4096).
INT_BLOCK_BYTES = 4 << 20
INT_BLOCK_MIN_ROWS = 256


def int_row_blocks(out_features: int, in_features: int, device: torch.device) -> list[slice]:
    """Slices of output rows to turn into int8 codes one at a time (one slice off the CPU)."""
    if torch.device(device).type != "cpu":
        return [slice(0, out_features)]
    return _row_slices(out_features, max(INT_BLOCK_MIN_ROWS, INT_BLOCK_BYTES // max(in_features, 1)))


def _row_slices(out_features: int, rows: int) -> list[slice]:
    """``[0, out_features)`` in slices of ``rows`` (the last shorter); one empty slice for no rows."""
    return [slice(start, min(out_features, start + rows)) for start in range(0, max(out_features, 1), rows)]


def weight_row_blocks(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None, blocks: list[slice]
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(rows, packed, scale, zero point)`` of each block of output rows (from :func:`cpu_row_blocks`)."""
    for rows in blocks:
        zero = None if weight_zero_point is None else weight_zero_point[rows]
        yield rows, weight_packed[rows], weight_scale[rows], zero


# Limits of the Triton kernel (weight_only_triton.py), kept here so that checking them never imports
# triton: importing a Triton module fixes, for the whole process, whether its kernels are compiled or
# interpreted.


def triton_block_k(group_size: int, cap: int = 128) -> int | None:
    """Largest power-of-two K step in [16, cap] that divides the group (any, when per channel)."""
    if group_size == -1:
        return min(cap, 64)
    bk = cap
    while bk >= 16:
        if group_size % bk == 0:
            return bk
        bk //= 2
    return None


def triton_unsupported_reason(
    *, bits: int, group_size: int, in_features: int, dtype: torch.dtype | None = None, **_: object
) -> str | None:
    """None when the Triton kernel takes this problem, else why not (used by the dispatcher)."""
    if bits not in (2, 3, 4, 8):
        return f"{bits}-bit weights are not supported"
    if group_size != -1 and triton_block_k(group_size) is None:
        return f"group_size {group_size} is not a multiple of 16"
    if group_size != -1 and in_features % group_size:
        return f"in_features {in_features} is not a multiple of group_size {group_size}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activations in {dtype} are not supported"
    return None


# ---------------------------------------------------------------------------------------------
# The op and its backends (highest priority first; `auto` takes the first that can run):
#   triton (CUDA; fused, up to CUDA_FUSED_MAX_M tokens) > triton_dequant (CUDA; above)
#   > cuda_tinygemm (CUDA, 4 bits, bf16; by name only until measured)
#   > cpu_native (CPU with AVX512-BF16, 4 bits) > cpu_packed (CPU, bf16/fp16 activations)
#   > torch (dequantize + matmul)
# Triton, cpu_native and cpu_packed are imported on first use (see _triton.py; cpu_packed imports this
# module).
# ---------------------------------------------------------------------------------------------


def triton_problem_unsupported(p: Problem) -> str | None:
    return triton_unavailable_reason(p.device) or triton_unsupported_reason(
        bits=p.bits, group_size=p.group_size, in_features=p.K, dtype=p.dtype
    )


def _weight_only_linear_triton(*args: object, **kwargs: object) -> torch.Tensor:
    return _triton_launcher()(*args, **kwargs)


@functools.cache
def _triton_launcher():
    """Imported on first use (``_triton.py``), then held: an import statement per forward costs about a
    microsecond, which a 16-token GEMM on a GPU does not have to spare."""
    from .weight_only_triton import weight_only_linear_triton

    return weight_only_linear_triton


def _cpu_packed_unsupported(p: Problem) -> str | None:
    from .cpu_packed import unsupported_reason

    return unsupported_reason(
        bits=p.bits, group_size=p.group_size, in_features=p.K, out_features=p.N, symmetric=p.symmetric, device=p.device
    )


def _cpu_packed_auto(p: Problem) -> bool:
    # bf16/fp16 models only: the kernels compute in bf16, float32 models keep the exact torch path.
    return p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)


def _weight_only_linear_cpu_packed(*args: object, **kwargs: object) -> torch.Tensor:
    from .cpu_packed import weight_only_linear_cpu

    return weight_only_linear_cpu(*args, **kwargs)


# Above this many tokens auto dequantizes the weight once and runs cuBLAS on CUDA: on an H200
# (2026-12-04, bench --full) dequantize + cuBLAS, with the dequantization in torch ops, took
# 0.43-0.46x dense time at M = 4096 on all four dLLM shapes, the fused kernel 0.23-0.30x; at
# M = 1024 the fused kernel was ahead (0.22-0.30x against 0.17-0.21x). The Triton dequantization
# (one pass instead of a chain of torch element-wise ops) runs that strategy now; bench times both
# Triton backends at every M, so the next GPU check can move this threshold.
CUDA_FUSED_MAX_M = 2048


def _fused_auto(p: Problem) -> bool:
    return on_cuda(p) and (p.M is None or p.M <= CUDA_FUSED_MAX_M)


def _dequant_auto(p: Problem) -> bool:
    return on_cuda(p) and p.M is not None and p.M > CUDA_FUSED_MAX_M


def _weight_only_linear_triton_dequant(*args: object, **kwargs: object) -> torch.Tensor:
    from .weight_only_dequant_triton import weight_only_linear_triton_dequant

    return weight_only_linear_triton_dequant(*args, **kwargs)


register_backend(
    "weight_only_linear", "triton", _weight_only_linear_triton, family="triton", priority=20,
    unsupported=triton_problem_unsupported, auto=_fused_auto, summary="fused unpack + grouped dequant-GEMM",
)
register_backend(
    "weight_only_linear", "triton_dequant", _weight_only_linear_triton_dequant, family="triton", priority=19,
    unsupported=triton_problem_unsupported, auto=_dequant_auto,
    summary="one-pass Triton dequantization to the activation dtype, then the dense GEMM (many tokens)",
)


def _measured_backend(p: Problem) -> str | None:
    """The weight-only backend measured fastest for this layer's shape on this GPU (``kernels/tuned.py``),
    for grouped 4-bit codes with 16-bit activations (what the tile sweep times: symmetric g128). Not
    torch's tinygemm, even where it won: it holds a second, repacked copy of the weight (0.25x the
    bf16 bytes more), which a user quantizing to save memory did not ask for; it stays by name."""
    if (not on_cuda(p) or p.M is None or p.bits != 4 or p.group_size in (None, -1)
            or p.dtype not in (torch.bfloat16, torch.float16)):
        return None
    found = measured_entry("weight_only", p.M, p.N, p.K, p.device)
    return None if found is None or found["backend"] == "cuda_tinygemm" else found["backend"]


register_preference("weight_only_linear", _measured_backend)


def _tinygemm_unsupported(p: Problem) -> str | None:
    from .cuda_tinygemm import unsupported_reason

    return unsupported_reason(bits=p.bits, group_size=p.group_size, in_features=p.K, out_features=p.N,
                              dtype=p.dtype, device=p.device)


def _weight_only_linear_tinygemm(*args: object, **kwargs: object) -> torch.Tensor:
    from .cuda_tinygemm import weight_only_linear_tinygemm

    return weight_only_linear_tinygemm(*args, **kwargs)


# Not picked by auto until a GPU run has measured where it beats the Triton kernels (bench times it).
register_backend(
    "weight_only_linear", "cuda_tinygemm", _weight_only_linear_tinygemm, family="cuda_tinygemm", priority=18,
    unsupported=_tinygemm_unsupported, auto=lambda p: False,
    summary="torch's int4 tensor-core kernel (aten._weight_int4pack_mm, gpt-fast/torchao's), repacked once",
)


def _cpu_native_unsupported(p: Problem) -> str | None:
    from .cpu_native import unsupported_reason

    return unsupported_reason(bits=p.bits, group_size=p.group_size, in_features=p.K, out_features=p.N, device=p.device)


def _weight_only_linear_cpu_native(*args: object, **kwargs: object) -> torch.Tensor:
    from .cpu_native import weight_only_linear_native

    return weight_only_linear_native(*args, **kwargs)


register_backend(
    "weight_only_linear", "cpu_native", _weight_only_linear_cpu_native, family="cpu_native", priority=15,
    unsupported=_cpu_native_unsupported, auto=_cpu_packed_auto,
    summary="4-bit: AVX512-BF16 kernels on the checkpoint's bytes (fused for few tokens, cache-blocked "
    "for many); built from C on first use",
)
register_backend(
    "weight_only_linear", "cpu_packed", _weight_only_linear_cpu_packed, family="cpu_packed", priority=10,
    unsupported=_cpu_packed_unsupported, auto=_cpu_packed_auto,
    summary="torch's packed CPU int4/int8 kernels (few tokens) or bf16 dequantize + GEMM (many), repacked once",
)
register_backend(
    "weight_only_linear", "torch", weight_only_linear_torch, family="torch", priority=0, summary="dequantize + matmul"
)


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
    """``x [..., in] @ W_hat.T + bias -> [..., out]`` in ``x.dtype``; ``W_hat`` from the packed weight
    (layout in ``core/packing.py``, arithmetic in ``core/schemes.py``)."""
    b = choose(
        "weight_only_linear",
        x.device,
        backend,
        M=x.numel() // max(in_features, 1),
        K=in_features,
        N=weight_packed.shape[0],
        bits=bits,
        group_size=group_size,
        symmetric=weight_zero_point is None,
        dtype=x.dtype,
    )
    return b.impl(x, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias)
