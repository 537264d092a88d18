"""Weight-only quantized linear on the CPU through torch's packed CPU kernels, repacked once.

    y = x @ W_hat.T + bias,   W_hat[n, k] = (q[n, k] - z[n, g]) * s[n, g]   (as in weight_only.py)

Two torch ops do weight-only GEMMs on x86 CPUs without materialising ``W_hat``:

* ``aten._weight_int4pack_mm_for_cpu(x, w, group, scale_and_zero)``: 4-bit codes in the layout of
  ``aten._convert_weight_to_int4pack_for_cpu(codes int32 [N, K], inner_k_tiles)`` (uint8 ``[N, K/2]``;
  needs ``N % 16 == 0``), a group of 32, 64, 128 or 256 along K, and ``scale_and_zero`` ``[K/group, N,
  2]`` in the activations' dtype; it computes ``w = (q - 8) * scale + zero``. Our zero point ``z`` is an
  integer code, so ``zero = (8 - z) * s`` (0 for symmetric weights, whose ``z`` is 8). A group that is a
  multiple of a supported one (``-1`` = per channel, 512, ...) is expressed by repeating its scales.
* ``aten._weight_int8pack_mm(x, w int8 [N, K], scales [N])``: ``x @ (w * scales).T``, so 8-bit
  *symmetric per-channel* weights only (``w = q - 128``).

Both are AVX-512/AVX2 loops that dequantize tiles in registers: they read 4x (int4) or 2x (int8)
fewer weight bytes than a bf16 GEMM, which wins while the GEMM is memory-bound (few tokens), but
they do not use AMX, so their cost grows linearly with M. For many tokens this module dequantizes
to bf16 in row blocks and runs the dense bf16 GEMM (AMX where the CPU has it). The switch point
``PACKED_MAX_M`` was measured (docs/benchmarks.md, "CPU weight-only kernels").

Arithmetic: activations are rounded to bf16 and the output comes back in ``x.dtype``; the kernels
accumulate in float32. Scales are used in bf16. Hence the relative error against the float64
product of the same ``x`` and ``W_hat`` is a few bf16 ulps (2**-8 = 0.4 %) at most, about 0.3 % on
random data, which is why the dispatcher picks this backend automatically only for bf16/fp16
activations (a model run in bf16 already accepts bf16 rounding); float32 models keep the exact
``torch`` backend unless ``backend="cpu_packed"`` is asked for.

Repacking happens once per weight: :func:`prepare` (call it at load time, or let the first call do
it) converts the packed tensor and caches the result keyed by the tensor object (weakly, so it
goes away with the module) and validated by its data pointer and version counter, so an in-place
change of the weight is noticed. The many-token path reads the checkpoint layout itself and caches
only the kernel's bf16 scales; the CPU layout of the codes is made the first time the packed kernel
runs. A model that only ever runs more than ``PACKED_MAX_M`` tokens a call (a dLLM denoising whole
sequences) therefore stays at the checkpoint's size (0.26x the bf16 bytes at W4 g128); once a
few-token call has run, the CPU layout sits *beside* the checkpoint layout (2 x 0.25 at 4 bits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layouts import LayoutCache, tensors_key

from .weight_only import unpack_codes

INT4_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu takes, largest first
INNER_K_TILES = 2  # accepted by the CPU converter (2, 4, 8 give the same CPU layout)
# Up to this many rows (tokens) the packed kernels beat dequantize + bf16 GEMM; above, the
# dequantized bf16 GEMM wins. Measured on a 2-core Xeon with AMX and AVX-512 (1 thread), see
# docs/benchmarks.md: at 4096 x 4096 the packed kernels cost ~0.37 ms per row, dequantizing to bf16
# ~23 ms (int4) or ~14 ms (int8) per call, so they cross near M = 64-96 (int4) and 32-64 (int8).
PACKED_MAX_M = {4: 80, 8: 48}
# Bytes of bf16 W dequantized at a time on the bf16 path: the block stays in cache for its GEMM and
# its temporaries stay below glibc's mmap threshold (fresh pages, faulted in on every call, made the
# time swing by 15 % between processes). Xeon, 1 thread, time / dense at M = 256: blocks of 1024 rows
# (24 MiB at K = 12288) 3.27-3.76, 128 rows (3 MiB) 2.80-2.91; at K = 4096 1024 rows 3.13, 384 rows 2.9.
DEQUANT_BLOCK_BYTES = 3 << 20


def _ops_available() -> bool:
    aten = torch.ops.aten
    return all(
        hasattr(aten, name)
        for name in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm")
    )


def int4_kernel_group(group_size: int, in_features: int) -> int | None:
    """The kernel group (32..256) that expresses ``group_size`` (a divisor of it), or None."""
    group = in_features if group_size == -1 else group_size
    if group <= 0 or in_features % group:
        return None
    return next((g for g in INT4_GROUPS if group % g == 0), None)


def unsupported_reason(
    *,
    bits: int | None = None,
    group_size: int | None = None,
    in_features: int | None = None,
    out_features: int | None = None,
    symmetric: bool | None = None,
    device: torch.device | None = None,
    **_: object,
) -> str | None:
    """None when :func:`weight_only_linear_cpu` takes this problem, else why not."""
    if device is not None and torch.device(device).type != "cpu":
        return "the packed CPU kernels need CPU tensors"
    if not _ops_available():
        return f"torch {torch.__version__} lacks the packed CPU weight-only kernels"
    if bits not in (None, 4, 8):
        return f"{bits}-bit weights have no packed CPU kernel (4 and 8 bits do)"
    if bits == 4 and group_size is not None and in_features is not None:
        if int4_kernel_group(group_size, in_features) is None:
            return (
                f"group_size {group_size} with in_features {in_features}: the int4 CPU kernel needs a group "
                f"that is a multiple of 32 (it takes {'/'.join(map(str, INT4_GROUPS[::-1]))}) dividing in_features"
            )
    if bits == 4 and out_features is not None and out_features % 16:
        return f"out_features {out_features} is not a multiple of 16 (the int4 CPU layout needs it)"
    if bits == 8 and group_size not in (None, -1):
        return f"8-bit group_size {group_size}: the int8 CPU kernel takes per-channel scales only"
    if bits == 8 and symmetric is False:
        return "asymmetric 8-bit weights: the int8 CPU kernel takes symmetric weights only"
    return None


@dataclass
class CpuPackedWeight:
    """One weight in the CPU kernels' layout (see the module docstring)."""

    bits: int
    in_features: int
    out_features: int
    group_size: int  # as in the checkpoint (-1 = per channel)
    kernel_group: int | None  # int4: the group passed to the kernel
    weight: torch.Tensor | None  # int4: uint8 [N, K/2] (CPU layout); int8: int8 [N, K]; None until needed
    scales: torch.Tensor  # int4: bf16 [K/kernel_group, N, 2] (scale, zero); int8: bf16 [N]
    key: tuple  # (data_ptr, version) of weight_packed, scale and zero point when made

    @property
    def nbytes(self) -> int:
        weight = 0 if self.weight is None else self.weight.numel() * self.weight.element_size()
        return weight + self.scales.numel() * self.scales.element_size()


def repack(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    *,
    with_weight: bool = True,
) -> CpuPackedWeight:
    """Convert one packed weight (core/packing.py layout) to the CPU kernels' layout; without
    ``with_weight`` only the kernel's scales (what the many-token path needs)."""
    n = weight_packed.shape[0]
    reason = unsupported_reason(
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        out_features=n,
        symmetric=weight_zero_point is None,
        device=weight_packed.device,
    )
    if reason:
        raise ValueError(reason)
    group = in_features if group_size == -1 else group_size
    groups = in_features // group
    if tuple(weight_scale.shape) != (n, groups):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected {(n, groups)}")
    key = tensors_key(weight_packed, weight_scale, weight_zero_point)
    s = weight_scale.to(torch.float32)
    if bits == 8:
        w = _cpu_weight(weight_packed, 8, in_features) if with_weight else None
        return CpuPackedWeight(8, in_features, n, group_size, None, w, s.reshape(n).to(torch.bfloat16), key)
    kg = int4_kernel_group(group_size, in_features)
    assert kg is not None
    w = _cpu_weight(weight_packed, 4, in_features) if with_weight else None
    sz = int4_scale_and_zero(weight_scale, weight_zero_point, group_size, in_features, kg, torch.bfloat16)
    return CpuPackedWeight(4, in_features, n, group_size, kg, w, sz, key)


def int4_scale_and_zero(
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    group_size: int,
    in_features: int,
    kernel_group: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """torch's int4 kernels' ``scale_and_zero`` ``[K/kernel_group, N, 2]`` (CPU and CUDA alike): they
    compute ``(q - 8) * scale + zero``, ours is ``(q - z) * s``, so ``zero = (8 - z) * s`` (0 when
    symmetric: ``z`` is 8); each of our groups repeats over the kernel groups it spans."""
    s = weight_scale.to(torch.float32)
    zero = torch.zeros_like(s) if weight_zero_point is None else (8.0 - weight_zero_point.to(torch.float32)) * s
    sz = torch.stack([s, zero], dim=-1)  # [N, groups, 2]
    group = in_features if group_size == -1 else group_size
    if group != kernel_group:
        sz = sz.repeat_interleave(group // kernel_group, dim=1)
    return sz.transpose(0, 1).contiguous().to(dtype)


def _cpu_weight(weight_packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The codes in the packed kernel's layout (uint8 int4-pack, or int8 ``q - 128``)."""
    codes = unpack_codes(weight_packed, bits, in_features)
    if bits == 8:
        return (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), INNER_K_TILES)


_CACHE = LayoutCache()


def prepare(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    *,
    with_weight: bool = True,
) -> CpuPackedWeight:
    """The cached CPU layout of ``weight_packed`` (repacked now if absent or if any input changed);
    without ``with_weight``, the cached scales suffice (the codes' CPU layout is not made)."""
    key = tensors_key(weight_packed, weight_scale, weight_zero_point)
    hit = _CACHE.current(weight_packed, key)
    if hit is not None and hit.bits == bits and hit.group_size == group_size:
        if hit.weight is not None or not with_weight:
            return hit
        packed = dataclasses.replace(hit, weight=_cpu_weight(weight_packed, bits, in_features))
    else:
        packed = repack(weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features,
                        with_weight=with_weight)
    return _CACHE.put(weight_packed, packed)


cached_nbytes = _CACHE.nbytes  # bytes held for a weight beside it (scales, and the CPU layout once made)


def cached_tensors(weight_packed: torch.Tensor) -> list[torch.Tensor]:
    """The tensors behind :func:`cached_nbytes`."""
    entry = _CACHE.get(weight_packed)
    return [] if entry is None else [t for t in (entry.weight, entry.scales) if t is not None]


forget = _CACHE.forget  # drop what is cached for a weight (the next call repacks what it needs)


def prepare_module(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Repack every weight-only ``QdlmLinear`` of ``module`` that the CPU kernels take, now (not
    at its first call); returns how many were repacked. Not called by the loader (repacking at the
    first call keeps a model that never runs few-token batches at the packed size). With a ``dtype`` other than bf16/fp16
    nothing is repacked (the dispatcher runs float32 models on the exact torch path)."""
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return 0
    done = 0
    for m in module.modules():
        spec = getattr(m, "spec", None)
        wp = getattr(m, "weight_packed", None)
        if spec is None or wp is None or wp.device.type != "cpu" or getattr(m, "_integer_input", False):
            continue
        zp = getattr(m, "weight_zero_point", None)
        if unsupported_reason(
            bits=spec.bits,
            group_size=spec.group_size,
            in_features=spec.in_features,
            out_features=wp.shape[0],
            symmetric=zp is None,
        ):
            continue
        prepare(wp, m.weight_scale, zp, spec.bits, spec.group_size, spec.in_features)
        done += 1
    return done


def packed_matmul(x2: torch.Tensor, p: CpuPackedWeight) -> torch.Tensor:
    """``x2 [M, K]`` (bf16, contiguous) through the packed kernel; bf16 ``[M, N]``."""
    if p.bits == 4:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p.weight, p.kernel_group, p.scales)
    return torch.ops.aten._weight_int8pack_mm(x2, p.weight, p.scales)


def _dequant_int8_bf16(weight_packed: torch.Tensor, p: CpuPackedWeight, start: int, stop: int) -> torch.Tensor:
    """bf16 ``W_hat[start:stop]`` from the checkpoint's bytes (byte j = code j): ``(q - 128) * s``;
    codes and ``q - 128`` are exact in bf16, so only the product rounds (as on the packed kernel)."""
    codes = unpack_codes(weight_packed[start:stop], 8, p.in_features)
    return codes.to(torch.bfloat16).sub_(128).mul_(p.scales[start:stop].unsqueeze(-1))


def _dequant_int4_bf16(
    weight_packed: torch.Tensor, p: CpuPackedWeight, start: int, stop: int
) -> torch.Tensor:
    """bf16 ``W_hat[start:stop]`` from the checkpoint's packed words (byte j = codes 2j | 2j+1 << 4)
    and the kernel's bf16 scale/zero: ``q * s + (zero - 8 s)``, one fused pass after the unpack."""
    k = p.in_features
    b = weight_packed[start:stop].contiguous().view(torch.uint8)[:, : k // 2]
    rows = stop - start
    kg = p.kernel_group
    sz = p.scales[:, start:stop].transpose(0, 1).to(torch.float32)  # [rows, K/kg, 2]
    s, zero = sz[..., 0], sz[..., 1]
    offset = (zero - 8.0 * s).to(torch.bfloat16).unsqueeze(-1)
    w = torch.empty(rows, k // 2, 2, dtype=torch.bfloat16)
    w[..., 0] = b & 15
    w[..., 1] = b >> 4
    w = w.view(rows, k // kg, kg)
    w.mul_(s.to(torch.bfloat16).unsqueeze(-1)).add_(offset)
    return w.view(rows, k)


def dequant_matmul(x2: torch.Tensor, weight_packed: torch.Tensor, p: CpuPackedWeight) -> torch.Tensor:
    """``x2 [M, K]`` bf16 times the weight dequantized to bf16 in blocks of rows; bf16 ``[M, N]``."""
    n = p.out_features
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    rows = max(16, DEQUANT_BLOCK_BYTES // (2 * p.in_features) // 16 * 16)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        dequant = _dequant_int4_bf16 if p.bits == 4 else _dequant_int8_bf16
        w = dequant(weight_packed, p, start, stop)
        torch.matmul(x2, w.T, out=out[:, start:stop])
    return out


def use_packed(bits: int, m: int) -> bool:
    """The measured rule: packed kernel up to ``PACKED_MAX_M[bits]`` rows, dequantized bf16 GEMM above."""
    return m <= PACKED_MAX_M[bits]


def weight_only_linear_cpu(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    *,
    path: str | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W_hat.T + bias`` in ``x.dtype``, computed in bf16 on the packed CPU kernels
    (few tokens) or a dequantized bf16 GEMM (many); ``path`` = ``"packed"`` / ``"dequant"`` forces one."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).to(torch.bfloat16).contiguous()
    m = x2.shape[0]
    if path is None:
        path = "packed" if use_packed(bits, m) else "dequant"
    if path not in ("packed", "dequant"):
        raise ValueError(f"path must be 'packed' or 'dequant', got {path!r}")
    p = prepare(weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features,
                with_weight=path == "packed")
    if m == 0:
        y = x2.new_zeros(0, p.out_features)
    elif path == "packed":
        y = packed_matmul(x2, p)
    else:
        y = dequant_matmul(x2, weight_packed, p)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, p.out_features)
