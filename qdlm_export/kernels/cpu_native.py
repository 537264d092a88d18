"""Native int4 weight-only kernels for x86 CPUs with AVX512-BF16, built from ``native/*.c`` on first use.

    y = x @ W_hat.T,   W_hat[n, k] = q[n, k] * s[g, n] - zs[g, n]   (zs = z * s, g = k // group)

Three C kernels do the work (``native/int4_avx512bf16.c``; :func:`reference_gemm` and
:func:`reference_dequant` are their plain torch statements). All read the checkpoint's packed bytes
directly, so a model holds no second layout of its codes.

* ``gemm`` (few tokens, AVX-512): codes are widened to exact bf16 integers in registers and
  multiplied with the activations by AVX512-BF16 dot products, float32 sums, each group's scale
  applied once.
* ``blocked_gemm`` (many tokens): a cache-blocked GEMM. Each weight element is dequantized to bf16
  once per call, into panels small enough to stay in cache while every block of tokens runs over
  them, with the same dot products, or on CPUs with AMX (Intel Xeon since Sapphire Rapids) on the
  tile unit. Its scratch is about 768 KiB plus 3 KiB per token per thread (AMX: 256 KiB plus 1 KiB).
* ``amx_codes_gemm`` (few tokens, AMX): the codes themselves, as exact bf16 ``128 + q``, are the tile
  products' weight operand and each group's scale is applied to the tile sums, so nothing is
  dequantized per weight; 0.4-0.5x the dense bf16 GEMM's time at 1-16 tokens on a Xeon, where the
  dense GEMM runs on AMX too.

:func:`linear` chooses by the measured rule (docs/benchmarks.md): with AMX, ``amx_codes_gemm`` up to
``AMX_CODES_MAX_M`` tokens and the blocked kernel on tiles above (``QDLM_EXPORT_AMX=0`` keeps the
AVX-512 kernels); without, the fused kernel up to ``NATIVE_MAX_M`` tokens, the blocked one above.

Why native code: torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) multiplies in float32
FMAs, slower than the bf16 GEMM from ~12 tokens on, and eager dequantization makes several passes over
memory; neither torch nor torchao ships an int4 kernel built on ``vdpbf16ps`` or AMX tiles.

The library is built and loaded by ``native_build.py``; where it cannot be, :func:`unavailable_reason`
says why and ``cpu_packed`` uses torch's kernels instead. ``ctypes`` releases the GIL during a call,
so the work is split across ``torch.get_num_threads()`` Python threads (tiles of 16 outputs, or
panels of 32).
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .native_build import CACHE_ENV, SWITCH  # noqa: F401 (the switches users set, named here too)
from .native_build import build as build_library
from .registry import forget_selections
from .layouts import LayoutCache, tensors_key

AMX_SWITCH = "QDLM_EXPORT_AMX"  # "0" keeps the AVX-512 kernels where AMX exists
TILE_N = 16  # outputs per tile (one AVX-512 register of float32)
TILE_M = 16  # tokens per pass over a tile (the C file's TILE_M)
CHUNK_K = 128  # codes of a row read at a time
# Up to this many tokens the fused kernel beats the blocked one (measured on the Zen 4 EPYC, 1 thread,
# time / dense bf16, docs/benchmarks.md: at 4096 x 4096 0.91 vs 0.97 at M = 32, 0.93 vs 0.95 at 48,
# 1.08 vs 0.99 at 64; at 12288 x 4096 0.86 vs 0.98 at 32, 1.03 vs 0.97 at 48).
NATIVE_MAX_M = 40
# With AMX, up to this many tokens the codes go on the tiles (Xeon, 1 thread, time / dense bf16 at
# 4096 x 4096 and 12288 x 4096: M = 64 0.76 / 0.62 vs the blocked kernel's 0.91 / 0.74, M = 128
# 0.85 / 0.70 vs 0.87 / 0.75, M = 256 1.26 / 1.28 vs 0.94 / 1.04).
AMX_CODES_MAX_M = 128
BLOCKED_PANEL_N = 32  # outputs per panel of the blocked kernel (the C file's PANEL_N)
# Tokens per call of the blocked kernel: its float32 sums take 1 KiB per token and thread, so a long
# prompt runs in chunks (each dequantizes the weight again: ~1 % of a 4096-token chunk's time).
BLOCKED_MAX_M = 4096
KERNELS = ("fused", "blocked", "amx_codes")

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_POOL: dict[tuple[int, int], ThreadPoolExecutor] = {}
_SCRATCH = threading.local()  # per-thread scratch of the blocked kernel


def amx_available() -> bool:
    """Whether the blocked kernel runs on AMX tiles here: the CPU has AMX-BF16, Linux granted the
    tile registers, and ``QDLM_EXPORT_AMX`` is not "0"."""
    if os.environ.get(AMX_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    lib = library()
    if lib is None:
        return False
    if "amx" not in _STATE:
        with _LOCK:
            if "amx" not in _STATE:
                _STATE["amx"] = bool(lib.qdlm_amx_ready())
    return bool(_STATE["amx"])


def library() -> ctypes.CDLL | None:
    """The loaded native library, built on the first call; None where it cannot run (see
    :func:`unavailable_reason`)."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                lib, reason = build_library()
                _STATE["reason"] = reason
                _STATE["lib"] = lib
    return _STATE["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """None when the native kernels run on this machine, else why not (builds them if needed)."""
    library()
    return _STATE["reason"]  # type: ignore[return-value]


def forget_library() -> None:
    """Forget the build outcome, so that the next call builds or reloads (for tests)."""
    with _LOCK:
        _STATE.clear()
    forget_selections()  # the registry's cached choices assumed the old outcome


def shape_unsupported_reason(*, in_features: int, out_features: int, group_size: int) -> str | None:
    """None when the native kernels take this weight's shape, else why not."""
    group = in_features if group_size == -1 else group_size
    if group <= 0 or in_features % group:
        return f"group_size {group_size} does not divide in_features {in_features} (-1 means per channel)"
    if out_features % TILE_N:
        return f"out_features {out_features} is not a multiple of {TILE_N}"
    if in_features % CHUNK_K:
        return f"in_features {in_features} is not a multiple of {CHUNK_K}"
    if group % 32 or not (CHUNK_K % group == 0 or group % CHUNK_K == 0):
        return f"group_size {group_size}: the native kernel takes 32, 64, or multiples of 128"
    return None


def native_scales(weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[2, G, N]``: the scales ``s`` and ``zs = z * s`` per group and output, from the
    checkpoint's ``[N, G]`` scale and integer zero point (8 for symmetric 4-bit weights), the layout
    the C functions read."""
    s = weight_scale.to(torch.float32)
    z = torch.full_like(s, 8.0) if weight_zero_point is None else weight_zero_point.to(torch.float32)
    zs = z * s
    return torch.stack([s.T, zs.T]).contiguous()


def _threads(units: int, min_units: int) -> int:
    return max(1, min(torch.get_num_threads(), units // max(min_units, 1)))


def _run_split(fn, total: int, threads: int) -> None:
    """fn(start, stop) over [0, total) in ``threads`` contiguous shares: the calling thread runs the
    first, pool threads the others (ctypes drops the GIL during the C calls)."""
    bounds = [total * i // threads for i in range(threads + 1)]
    shares = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    if len(shares) <= 1:
        fn(0, total)
        return
    helpers = len(shares) - 1
    # keyed by process too: a forked child inherits the pool object but not its threads
    key = (os.getpid(), helpers)
    pool = _POOL.get(key)
    if pool is None:
        with _LOCK:
            pool = _POOL.setdefault(key, ThreadPoolExecutor(helpers, thread_name_prefix="qdlm-native"))
    futures = [pool.submit(fn, a, b) for a, b in shares[1:]]
    try:
        fn(*shares[0])
    finally:
        for f in futures:
            f.result()


def _check_weight(codes: torch.Tensor, scales: torch.Tensor, group: int, k: int) -> int:
    """The weight side of a call (codes, scales, shape rules); returns N."""
    n = codes.shape[0]
    if codes.device.type != "cpu" or scales.device.type != "cpu":
        raise ValueError("the native kernels take CPU tensors only (x, codes and scales)")
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.stride(1) != 1 or codes.shape[1] < k // 2:
        raise ValueError(f"codes must be uint8 [N, >= K/2] with unit column stride, got {tuple(codes.shape)}")
    reason = shape_unsupported_reason(in_features=k, out_features=n, group_size=group)
    if reason:
        raise ValueError(reason)
    if scales.dtype != torch.float32 or tuple(scales.shape) != (2, k // group, n) or not scales.is_contiguous():
        raise ValueError(f"scales must be contiguous float32 {(2, k // group, n)}, got {tuple(scales.shape)}")
    return n


def _check(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> tuple[int, int, int]:
    """A whole call: the activations, then the weight; returns (M, K, N)."""
    m, k = x2.shape
    if x2.device.type != "cpu":
        raise ValueError("the native kernels take CPU tensors only (x, codes and scales)")
    if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
        raise ValueError("x must be a contiguous bf16 [M, K] tensor")
    return m, k, _check_weight(codes, scales, group, k)


def gemm(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``x2 [M, K]`` bf16 times ``W_hat.T`` by the fused kernel; bf16 ``[M, N]``."""
    lib = library()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    m, k, n = _check(x2, codes, scales, group)
    blocks = -(-m // TILE_M)
    xpairs = torch.empty(blocks * (k // 2) * TILE_M, dtype=torch.int32)
    xsum = torch.empty(m * (k // group), dtype=torch.float32)
    lib.qdlm_int4_prepare_x(x2.data_ptr(), m, k, group, xpairs.data_ptr(), xsum.data_ptr())
    y = torch.empty(m, n, dtype=torch.bfloat16)
    args = (xpairs.data_ptr(), xsum.data_ptr(), m, k, codes.data_ptr(), codes.stride(0), n,
            scales[0].data_ptr(), scales[1].data_ptr(), group, y.data_ptr())
    tiles = n // TILE_N
    _run_split(lambda a, b: lib.qdlm_int4_gemm_tiles(*args, a, b), tiles, _threads(tiles, 4))
    return y


def _scratch_bytes(nbytes: int) -> torch.Tensor:
    """This thread's scratch of at least ``nbytes``, 64-byte aligned, kept for the next call (its pages
    are faulted in once, not per call)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < nbytes + 64:
        buf = _SCRATCH.buf = torch.empty(nbytes + 64, dtype=torch.uint8)
    return buf[-buf.data_ptr() % 64 :]


def blocked_gemm(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``x2 [M, K]`` bf16 times ``W_hat.T`` by the blocked kernel (each weight element dequantized once
    per call into cache-sized panels, every token block run over them); bf16 ``[M, N]``."""
    lib = library()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    m, k, n = _check(x2, codes, scales, group)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    unit = BLOCKED_PANEL_N if n % BLOCKED_PANEL_N == 0 else TILE_N  # shares of whole panels
    units = n // unit
    mr = lib.qdlm_int4_blocked_mr()
    amx = amx_available()
    for m0 in range(0, m, BLOCKED_MAX_M):
        chunk = x2[m0 : m0 + BLOCKED_MAX_M]
        rows = chunk.shape[0]
        if amx:  # the tile unit reads x itself
            args = (chunk.data_ptr(), rows, k, codes.data_ptr(), codes.stride(0), n, scales[0].data_ptr(),
                    scales[1].data_ptr(), group, y[m0].data_ptr())
            nbytes = lib.qdlm_int4_amx_scratch(rows, k)
            _run_split(lambda a, b: lib.qdlm_int4_gemm_amx(*args, a * unit, b * unit, _scratch_bytes(nbytes).data_ptr()),
                       units, _threads(units, 2))
            continue
        xpairs = torch.empty(-(-rows // mr) * (k // 2) * mr, dtype=torch.int32)
        lib.qdlm_bf16_pairs(chunk.data_ptr(), rows, k, xpairs.data_ptr())
        args = (xpairs.data_ptr(), rows, k, codes.data_ptr(), codes.stride(0), n, scales[0].data_ptr(),
                scales[1].data_ptr(), group, y[m0].data_ptr())
        scratch_bytes = lib.qdlm_int4_blocked_scratch(rows)

        def share(a: int, b: int) -> None:
            lib.qdlm_int4_gemm_blocked(*args, a * unit, b * unit, _scratch_bytes(scratch_bytes).data_ptr())

        _run_split(share, units, _threads(units, 2))
    return y


def amx_codes_gemm(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``x2 [M, K]`` bf16 times ``W_hat.T`` on AMX tiles with the codes as the weight operand and each
    group's scale on the tile sums (few tokens); bf16 ``[M, N]``. Needs :func:`amx_available`."""
    lib = library()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    if not amx_available():
        raise RuntimeError(f"amx_codes_gemm needs AMX tiles (this CPU lacks them, Linux refused them, or {AMX_SWITCH}=0)")
    m, k, n = _check(x2, codes, scales, group)
    xb = torch.empty(lib.qdlm_int4_amxi_x_words(m, k), dtype=torch.int32)
    xsum = torch.empty(k // group * -(-m // 16) * 16, dtype=torch.float32)
    lib.qdlm_int4_amxi_prepare_x(x2.data_ptr(), m, k, group, xb.data_ptr(), xsum.data_ptr())
    y = torch.empty(m, n, dtype=torch.bfloat16)
    args = (xb.data_ptr(), xsum.data_ptr(), m, k, codes.data_ptr(), codes.stride(0), n, scales[0].data_ptr(),
            scales[1].data_ptr(), group, y.data_ptr())
    nbytes = lib.qdlm_int4_amxi_scratch(m)
    unit = BLOCKED_PANEL_N if n % BLOCKED_PANEL_N == 0 else TILE_N  # shares of whole 32-output blocks
    _run_split(lambda a, b: lib.qdlm_int4_gemm_amxi(*args, a * unit, b * unit, _scratch_bytes(nbytes).data_ptr()),
               n // unit, _threads(n // unit, 2))
    return y


def pick_kernel(m: int) -> str:
    """The measured rule for ``m`` tokens: one of :data:`KERNELS`."""
    if amx_available():
        return "amx_codes" if m <= AMX_CODES_MAX_M else "blocked"
    return "fused" if m <= NATIVE_MAX_M else "blocked"


def linear(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int, *, kernel: str | None = None) -> torch.Tensor:
    """``x2 @ W_hat.T`` by ``kernel`` (one of :data:`KERNELS`; default :func:`pick_kernel`)."""
    kernel = pick_kernel(x2.shape[0]) if kernel is None else kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r} is not a native kernel; use one of {', '.join(KERNELS)}")
    run = {"fused": gemm, "blocked": blocked_gemm, "amx_codes": amx_codes_gemm}[kernel]
    return run(x2, codes, scales, group)


def evict_from_caches(tensors: "list[torch.Tensor] | tuple[torch.Tensor, ...]") -> bool:
    """Write back and drop the CPU cache lines of ``tensors`` (CLFLUSHOPT), so that the next read of
    them comes from memory, as a model's weights do in a forward pass (they do not fit in cache); for
    the benchmark's cold-weight timing. False, doing nothing, where the native library is unavailable;
    tensors off the CPU are skipped."""
    lib = library()
    if lib is None:
        return False
    for t in tensors:
        if t.device.type != "cpu" or not t.numel():
            continue
        if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass (torchao's): its own storage is empty
            evict_from_caches([getattr(t, name) for name in t.__tensor_flatten__()[0]])
            continue
        storage = t.untyped_storage()  # the whole allocation, whatever the view
        lib.qdlm_evict(storage.data_ptr(), storage.nbytes())
    return True


# -- the weight-only backend: scales prepared once per weight --------------------------------------


@dataclass
class NativeWeight:
    """What the native kernels keep beside a checkpoint weight: only its scales in their layout."""

    group: int
    scales: torch.Tensor  # float32 [2, G, N]: s and z * s
    key: tuple  # (data_ptr, version, shape) of weight_packed, scale and zero point when made

    @property
    def nbytes(self) -> int:
        return self.scales.numel() * self.scales.element_size()


_CACHE = LayoutCache()


def unsupported_reason(
    *,
    bits: int | None = None,
    group_size: int | None = None,
    in_features: int | None = None,
    out_features: int | None = None,
    device: torch.device | None = None,
    **_: object,
) -> str | None:
    """None when :func:`weight_only_linear_native` takes this problem, else why not."""
    if device is not None and torch.device(device).type != "cpu":
        return "the native kernels need CPU tensors"
    if bits not in (None, 4):
        return f"{bits}-bit weights: the native kernel takes 4 bits"
    if None not in (group_size, in_features, out_features):  # before the availability check, which builds
        reason = shape_unsupported_reason(in_features=in_features, out_features=out_features, group_size=group_size)
        if reason:
            return reason
    return unavailable_reason()


def prepare(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
            group_size: int, in_features: int) -> NativeWeight:
    """The cached scales of ``weight_packed`` (made again if any input changed in place)."""
    key = tensors_key(weight_packed, weight_scale, weight_zero_point)
    hit = _CACHE.current(weight_packed, key)
    if hit is not None:
        return hit
    n = weight_packed.shape[0]
    group = in_features if group_size == -1 else group_size
    if any(t is not None and t.device.type != "cpu" for t in (weight_packed, weight_scale, weight_zero_point)):
        raise ValueError("the native kernels take CPU tensors only (weight, scale and zero point)")
    if tuple(weight_scale.shape) != (n, in_features // group):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}, expected {(n, in_features // group)}")
    return _CACHE.put(weight_packed, NativeWeight(group, native_scales(weight_scale, weight_zero_point), key))


cached_nbytes = _CACHE.nbytes  # bytes held for a weight beside it (its scales in the kernels' layout)


def cached_tensors(weight_packed: torch.Tensor) -> list[torch.Tensor]:
    """The tensors behind :func:`cached_nbytes`."""
    entry = _CACHE.get(weight_packed)
    return [] if entry is None else [entry.scales]


forget = _CACHE.forget


def weight_only_linear_native(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W_hat.T + bias`` in ``x.dtype``, computed from bf16 activations with float32
    sums; ``kernel`` forces one of :data:`KERNELS` (default: :func:`pick_kernel`)."""
    reason = unsupported_reason(bits=bits, group_size=group_size, in_features=in_features,
                                out_features=weight_packed.shape[0], device=weight_packed.device)
    if reason:
        raise ValueError(reason)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).to(torch.bfloat16).contiguous()
    w = prepare(weight_packed, weight_scale, weight_zero_point, group_size, in_features)
    n = weight_packed.shape[0]
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, n)
    else:
        # the checkpoint's int32 words read as bytes: byte j of a row = codes 2j | 2j+1 << 4
        y = linear(x2, weight_packed.contiguous().view(torch.uint8), w.scales, w.group, kernel=kernel)
    y = y.to(x.dtype)
    if bias is not None:  # in the caller's dtype (a float32 model's bias is not rounded to bf16)
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)


# -- plain torch statements of the two C functions (float64), for tests and for reading ------------


def reference_dequant(codes: torch.Tensor, scales: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """float64 ``W_hat [N, K]`` from the checkpoint bytes and :func:`native_scales`."""
    b = codes[:, : in_features // 2].to(torch.int64)
    q = torch.stack([b & 15, b >> 4], dim=-1).reshape(codes.shape[0], in_features).to(torch.float64)
    s, zs = (t.T.to(torch.float64).repeat_interleave(group, dim=1) for t in scales)
    return q * s - zs


def reference_gemm(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """float64 ``x2 @ W_hat.T``."""
    return x2.to(torch.float64) @ reference_dequant(codes, scales, group, x2.shape[1]).T
