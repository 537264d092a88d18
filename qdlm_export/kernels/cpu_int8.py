"""Integer-activation kernels in C for the CPU: the int8 GEMM of ``int8_gemm`` on Intel AMX tiles
(``TDPBSSD``); on CPUs without AMX, W8A8 and W4A4 with few tokens on AVX512-VNNI (``VPDPBUSD``, the
stored codes as unsigned bytes, :func:`packed_int_linear_vnni`); and the per-token quantization of bf16
activations (AVX-512).

    y = (a_q @ b_q.T) * a_scale * b_scale.T + bias      (int32 sums, exact; scales in float32)

``torch._int_mm`` on the CPU does not reach AMX: on a Xeon with AMX it ran at about the speed of
the dense bf16 GEMM (which does run on AMX), so W8A8 gained nothing from its integer weights. The C
function (``native/int4_avx512bf16.c``, ``qdlm_int8_gemm_amx``; built and loaded with the int4
kernels by ``cpu_native``) lays each slab of the weight out for the tile unit per call, as the int4
kernel dequantizes its panels, and multiplies 32 tokens x 32 outputs at a time. Checkpoint weights
(``packed_int_linear_amx``, backend ``cpu_amx`` of ``packed_int_linear``, what a loaded W8A8 or W4A4
model runs) go through the same GEMM from their packed codes, turned into int8 while the panels are
laid out: per-channel int4 codes into ``q - z``, symmetric 8-bit codes into ``q - 128`` (the top bit
flipped), so nothing unpacked is kept. Numbers in
docs/benchmarks.md ("AMX"). ``quantize_rows`` is ``int8.quantize_per_token_torch`` in one read per
pass instead of several float32 temporaries, bit for bit the same codes and scales.
"""

from __future__ import annotations

import functools

import torch

# the int4 kernels' library, thread split and per-thread scratch (one library, one pool)
from .cpu_native import AMX_SWITCH, _run_split, _scratch_bytes, _threads, amx_available, library
from .cpu_native import unavailable_reason as native_unavailable_reason

TILE_N = 16  # outputs per tile
TILE_K = 64  # int8 inputs per tile row


def unavailable_reason() -> str | None:
    """None when the AMX int8 GEMM runs here, else why not."""
    reason = native_unavailable_reason()
    if reason:
        return reason
    if not amx_available():
        return f"no AMX tiles here (the CPU lacks AMX, Linux refused them, or {AMX_SWITCH}=0)"
    if not _int8_unit():
        return "this CPU's AMX lacks the int8 unit (AMX-INT8)"
    return None


@functools.cache
def _int8_unit() -> bool:
    """Asked once: the C check runs cpuid and the tile-permission system call."""
    return bool(library().qdlm_amx_int8_ready())


def unsupported_reason(*, M: int | None = None, K: int | None = None, N: int | None = None, device=None, **_: object) -> str | None:
    if device is not None and torch.device(device).type != "cpu":
        return "the AMX int8 GEMM needs CPU tensors"
    if K is not None and K % TILE_K:
        return f"in_features {K} is not a multiple of {TILE_K}"
    if N is not None and N % TILE_N:
        return f"out_features {N} is not a multiple of {TILE_N}"
    return unavailable_reason()


def int8_gemm_amx(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Arguments as ``int8.int8_gemm_torch``: ``a_q [..., K]`` int8 with ``a_scale [..., 1]``, ``b_q [N, K]``
    int8 with ``b_scale [N]`` (or ``[N, 1]``)."""
    if a_q.dtype != torch.int8 or b_q.dtype != torch.int8:
        raise ValueError(f"int8_gemm expects int8 operands, got {a_q.dtype} and {b_q.dtype}")
    k, n = a_q.shape[-1], b_q.shape[0]
    reason = unsupported_reason(K=k, N=n, device=a_q.device)
    if reason:
        raise ValueError(reason)
    b = b_q.contiguous()
    return _amx_gemm("qdlm_int8_gemm_amx", a_q, a_scale, (b.data_ptr(),), b_scale, k, n, bias, out_dtype)


def _c_int_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, k: int, n: int,
                bias: torch.Tensor | None, out_dtype: torch.dtype, run) -> torch.Tensor:
    """What the C integer GEMMs share: activations ``[M, K]`` and both scales in the C layout, a float32
    output that ``run(a2, a_scale, b_scale, y)`` fills when there is work, then the bias in float32 and
    the output dtype (the torch backend's order, so the outputs agree bit for bit)."""
    lead = a_q.shape[:-1]
    a2 = a_q.reshape(-1, k).contiguous()
    a_s = a_scale.reshape(-1).to(torch.float32).contiguous()
    b_s = b_scale.reshape(-1).to(torch.float32).contiguous()
    y = torch.empty(a2.shape[0], n, dtype=torch.float32)
    if a2.shape[0] and n:
        run(a2, a_s, b_s, y)
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype).view(*lead, n)


def _amx_gemm(c_function: str, a_q: torch.Tensor, a_scale: torch.Tensor, weight_args: tuple, b_scale: torch.Tensor,
              k: int, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The AMX GEMMs in :func:`_c_int_gemm`: the C function over thread shares of whole 32-output
    panels. ``weight_args``: its weight arguments between K and N (the caller keeps the tensors)."""
    def run(a2: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, y: torch.Tensor) -> None:
        lib, m = library(), a2.shape[0]
        gemm = getattr(lib, c_function)
        nbytes = lib.qdlm_int8_amx_scratch(m, k)
        args = (a2.data_ptr(), m, k, *weight_args, n, a_s.data_ptr(), b_s.data_ptr(), y.data_ptr())
        unit = 32 if n % 32 == 0 else TILE_N
        _run_split(lambda lo, hi: gemm(*args, lo * unit, hi * unit, _scratch_bytes(nbytes).data_ptr()),
                   n // unit, _threads(n // unit, 2))

    return _c_int_gemm(a_q, a_scale, b_scale, k, n, bias, out_dtype, run)


def _packed_scheme_reason(path: str, bits: int | None, group_size: int | None, K: int | None,
                          symmetric: bool | None) -> str | None:
    """Why the C packed paths (AMX, VNNI) cannot take this weight scheme, or None: per-channel 4-bit
    codes, or symmetric 8-bit ones, whose q - z fits int8."""
    if bits is not None and bits not in (4, 8):
        return f"{bits}-bit weights: the {path} takes 4- and 8-bit codes"
    if bits == 8 and symmetric is False:
        return f"asymmetric 8-bit weights: q - z does not fit int8 (the {path} takes symmetric ones)"
    if group_size not in (None, -1) and group_size != K:
        return f"group_size {group_size}: the {path} takes per-channel weights (-1)"
    return None


def _stored_codes(weight_packed: torch.Tensor) -> torch.Tensor:
    """The checkpoint's int32 words as the bytes they are stored in (4 bits: byte j of a row = codes
    2j | 2j+1 << 4; 8 bits: byte j = code j). Rows may lie further apart than their codes' bytes (a
    row slice)."""
    return (weight_packed if weight_packed.stride(-1) == 1 else weight_packed.contiguous()).view(torch.uint8)


def _row_zeros(weight_zero_point: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Per-channel zero points as the C functions read them: int8 ``[N]``, or None (symmetric)."""
    return None if weight_zero_point is None else weight_zero_point.reshape(n).to(torch.int8).contiguous()


def packed_unsupported_reason(*, bits: int | None = None, group_size: int | None = None, K: int | None = None,
                              N: int | None = None, symmetric: bool | None = None, device=None, **_: object) -> str | None:
    """None when :func:`packed_int_linear_amx` takes this problem, else why not."""
    return (_packed_scheme_reason("AMX packed path", bits, group_size, K, symmetric)
            or unsupported_reason(K=K, N=N, device=device))


def packed_int_linear_amx(
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
    """Arguments as ``int8.packed_int_linear_torch``, per channel, 4 bits or 8 bits symmetric: the
    checkpoint's packed codes become int8 (``q - z``, ``q - 128``) on their way into the tile panels
    (nothing unpacked is kept), then the exact int32 products and the two scales as :func:`int8_gemm_amx`."""
    if x_q.dtype != torch.int8:
        raise ValueError(f"x_q must be int8, got {x_q.dtype}")
    k, n = in_features, weight_packed.shape[0]
    reason = packed_unsupported_reason(bits=bits, group_size=group_size, K=k, N=n,
                                       symmetric=weight_zero_point is None, device=x_q.device)
    if reason:
        raise ValueError(reason)
    codes = _stored_codes(weight_packed)
    if bits == 8:
        weight_args = (codes.data_ptr(), codes.stride(0))
        return _amx_gemm("qdlm_uint8_gemm_amx", x_q, x_scale, weight_args, weight_scale, k, n, bias, out_dtype)
    zeros = _row_zeros(weight_zero_point, n)
    weight_args = (codes.data_ptr(), codes.stride(0), None if zeros is None else zeros.data_ptr())
    return _amx_gemm("qdlm_int4a_gemm_amx", x_q, x_scale, weight_args, weight_scale, k, n, bias, out_dtype)


def quantize_unsupported_reason(*, dtype: torch.dtype | None = None, device=None, **_: object) -> str | None:
    if device is not None and torch.device(device).type != "cpu":
        return "the native quantizer needs CPU tensors"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float32):
        return f"the native quantizer reads bf16 or float32 activations, not {dtype}"
    return native_unavailable_reason()


def quantize_rows(x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q int8 [..., K], x_scale float32 [..., 1])`` of bf16 or float32 ``x`` (float32: what the
    loader's online transforms give), as ``quantize_per_token_torch``."""
    from .int8 import qmax_for

    reason = quantize_unsupported_reason(dtype=x.dtype, device=x.device)
    if reason:
        raise ValueError(reason)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32)
    fn = library().qdlm_quantize_rows_bf16 if x.dtype == torch.bfloat16 else library().qdlm_quantize_rows_f32
    if k and x2.shape[0]:
        fn(x2.data_ptr(), x2.shape[0], k, float(clip_ratio), float(qmax_for(bits)), q.data_ptr(), scale.data_ptr())
    elif x2.shape[0]:
        scale.zero_()
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


# -- W8A8 and W4A4 with few tokens on AVX512-VNNI (no AMX): qdlm_int_gemm_vnni reads the stored codes --


@functools.cache
def _vnni_unit() -> bool:
    return bool(library().qdlm_vnni_ready())


def vnni_unsupported_reason(*, bits: int | None = None, group_size: int | None = None, K: int | None = None,
                            symmetric: bool | None = None, device=None, **_: object) -> str | None:
    """None when :func:`packed_int_linear_vnni` takes this problem, else why not."""
    if device is not None and torch.device(device).type != "cpu":
        return "the VNNI int8 GEMM needs CPU tensors"
    reason = _packed_scheme_reason("VNNI path", bits, group_size, K, symmetric) or native_unavailable_reason()
    if reason:
        return reason
    return None if _vnni_unit() else "this CPU lacks AVX512-VNNI"


def _nibble_order(a2: torch.Tensor) -> torch.Tensor:
    """int8 ``[M, K]`` -> ``[M, K rounded up to 128]``: each 128 inputs as their 64 even ones, then
    their 64 odd ones (the order of a byte's low and high nibbles), zero past K."""
    m, k = a2.shape
    steps = -(-k // 128)
    padded = a2.new_zeros(m, steps * 128)
    padded[:, :k] = a2
    return padded.view(m, steps, 64, 2).transpose(-1, -2).contiguous().view(m, steps * 128)


def packed_int_linear_vnni(
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
    """Arguments as ``int8.packed_int_linear_torch``, per channel, 8 bits symmetric or 4 bits: the same
    outputs bit for bit, from the stored codes (no int8 copy of the weight)."""
    if x_q.dtype != torch.int8:
        raise ValueError(f"x_q must be int8, got {x_q.dtype}")
    k, n = in_features, weight_packed.shape[0]
    reason = vnni_unsupported_reason(bits=bits, group_size=group_size, K=k, symmetric=weight_zero_point is None,
                                     device=x_q.device)
    if reason:
        raise ValueError(reason)
    if x_q.shape[-1] != k:
        raise ValueError(f"x_q has {x_q.shape[-1]} inputs a row, the weight {k}")
    # the C function reads these as they are: a short one would be read past its end
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2 or 4 * weight_packed.shape[1] < -(-k * bits // 8):
        raise ValueError(f"weight_packed must be int32 [out, words] holding {k} codes of {bits} bits a row, "
                         f"got {weight_packed.dtype} {tuple(weight_packed.shape)}")
    for name, t, want in (("x_scale", x_scale, x_q.numel() // max(k, 1)), ("weight_scale", weight_scale, n),
                          ("weight_zero_point", weight_zero_point, n)):
        if t is not None and t.numel() != want:
            raise ValueError(f"{name} has {t.numel()} elements; the VNNI path takes one per {'token' if name == 'x_scale' else 'output row'} ({want})")
    codes, zeros = _stored_codes(weight_packed), _row_zeros(weight_zero_point, n)

    def run(a2: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, y: torch.Tensor) -> None:
        a = _nibble_order(a2) if bits == 4 else a2
        gemm = library().qdlm_int_gemm_vnni
        args = (a.data_ptr(), a.shape[0], k, a.shape[1], codes.data_ptr(), codes.stride(0), bits,
                None if zeros is None else zeros.data_ptr(), n, a_s.data_ptr(), b_s.data_ptr(), y.data_ptr())
        units = -(-n // TILE_N)
        _run_split(lambda lo, hi: gemm(*args, lo * TILE_N, min(n, hi * TILE_N)), units, _threads(units, 2))

    return _c_int_gemm(x_q, x_scale, weight_scale, k, n, bias, out_dtype, run)
