"""Walsh-Hadamard transforms over the last dim, Triton backend.

    fwht_triton(x, scale=1.0, out=None)              -> scale * (x @ S_n)   (n a power of two)
    hadamard_triton(x, normalized=True, inverse=False) -> x @ H_n (x @ H_n.T when inverse), / sqrt(n) when normalized

``S_n`` is the natural-order Sylvester matrix (symmetric), ``H_n = H_k (x) S_p`` the checkpoint
format's matrix (``hadamard.py``); power-of-two parts ``16 <= p <= 16384``
(``hadamard.triton_fwht_unsupported_reason`` says why not).

Instead of log2(p) butterfly passes, the kernel uses ``S_{ab} = S_a (x) S_b``: a row viewed as an
``[a, b]`` matrix ``X`` transforms to ``S_a X S_b``, two small matmuls on the tensor cores. The
Sylvester blocks are generated in registers (``S[i, j] = (-1)**popcount(i & j)``). Rows of
``p <= 128`` are batched ``BLOCK_R`` at a time as ``X [BLOCK_R, p] @ S_p``; longer rows take one
program each with ``a = 2**floor(m/2)``, ``b = 2**ceil(m/2)`` (both >= 16, ``tl.dot``'s minimum).

For ``n = k * p`` (``k`` > 1, e.g. LLaDA-8B's 12288 = 12 * 1024) one program holds the whole row as
``[k, p]`` (``k`` padded to ``KP`` rows of zeros), applies ``S_p`` to each of the k sub-rows and
then ``H_k^T`` (a ``[KP, KP]`` matrix read from memory) across them, and stores once: the row is
read and written once, where ``S_p`` then ``H_k`` in torch wrote and re-read it three more times
in float32 (an H200 measured the online Hadamards at 10 % of a QuaRot block's time that way).
Rows too large for one program's registers (``KP * p > FUSED_MAX_ELEMENTS``, e.g. 148 * 128) keep
that two-step path, and so do GPUs other than Hopper (sm_90): compiled for sm_80 / 89 / 100 / 120 the
fused kernel spills 4-56 KB a thread to local memory (``benchmarks/triton_compile_check.py``).

Precision: every product is with a +-1 matrix, so it is exact; sums are fp32. All MMAs are bf16
tensor-core MMAs on the data split into bf16 pieces: ``hi + lo`` for bf16/fp16 rows (exact for the
inputs, within 2**-16 of an fp32 intermediate, far below the output's rounding), ``hi + mid + lo``
for fp32 rows (the loader computes online transforms in fp32): about fp32's own rounding, where
fp32 (``ieee``) MMAs would run on the CUDA cores at a fraction of the tensor cores' rate.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from ._triton import cdiv, cuda_arch, interpret_mode
from .hadamard import cached_hadamard_k, split_size, triton_fwht_unsupported_reason, with_hadamard_k

FUSED_MAX_ELEMENTS = 16384  # KP * p held by one program (fp32, several live copies)
FUSED_MAX_KP = 64  # the padded H_k tile, KP * KP fp32 values, also lives in registers
FUSED_FAILED: dict[tuple, str] = {}  # (n, dtype, device type) -> why the fused kernel did not run


@triton.jit
def _sylvester_block(rows, cols):
    """``(-1)**popcount(i & j)`` as fp32 for index vectors < 2**16 (parity by xor-folding)."""
    v = rows[:, None] & cols[None, :]
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return (1 - 2 * (v & 1)).to(tl.float32)


@triton.jit
def _bf16_pieces_dot(piece, rest, s, DATA_LEFT: tl.constexpr, UPCAST: tl.constexpr):
    """One bf16 piece of the data (``rest`` rounded) times ``s``; returns (product, what is left)."""
    hi = rest.to(tl.bfloat16)
    left = rest - hi.to(tl.float32)
    # Every constexpr branch that returns has an else: the compiler, unlike the interpreter, goes on
    # past a taken branch's return, and a later return of another shape fails to compile.
    if UPCAST:  # the interpreter's bf16 dots are wrong: the same piece, multiplied in fp32
        a = hi.to(tl.float32)
        if DATA_LEFT:
            return tl.dot(a, s, piece, input_precision="ieee"), left
        else:
            return tl.dot(s, a, piece, input_precision="ieee"), left
    elif DATA_LEFT:
        return tl.dot(hi, s.to(tl.bfloat16), piece), left
    else:
        return tl.dot(s.to(tl.bfloat16), hi, piece), left


@triton.jit
def _pm1_dot(data, pm1, DATA_LEFT: tl.constexpr, PIECES: tl.constexpr, UPCAST: tl.constexpr):
    """``data @ pm1`` (or ``pm1 @ data``) for fp32 ``data`` and a +-1 (or 0) fp32 matrix ``pm1``, as
    PIECES bf16 MMAs on ``data = hi + mid + lo``: the +-1 entries and every piece are exact in bf16,
    products are exact, sums fp32. One piece holds bf16 data exactly, two fp16 data (and an fp32
    intermediate to 2**-16), three fp32 data to about its own rounding."""
    if DATA_LEFT:
        acc = tl.zeros((data.shape[0], pm1.shape[1]), dtype=tl.float32)
    else:
        acc = tl.zeros((pm1.shape[0], data.shape[1]), dtype=tl.float32)
    acc, rest = _bf16_pieces_dot(acc, data, pm1, DATA_LEFT, UPCAST)
    if PIECES >= 2:
        acc, rest = _bf16_pieces_dot(acc, rest, pm1, DATA_LEFT, UPCAST)
    if PIECES == 3:
        acc, rest = _bf16_pieces_dot(acc, rest, pm1, DATA_LEFT, UPCAST)
    return acc


@triton.jit
def _fwht_kernel(
    x_ptr,
    y_ptr,
    hk_ptr,
    R,
    stride_xr,
    stride_yr,
    scale,
    K_ORD: tl.constexpr,
    KP: tl.constexpr,
    A: tl.constexpr,
    B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    IN_PIECES: tl.constexpr,
    PIECES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    ib = tl.arange(0, B)
    s_b = _sylvester_block(ib, ib)
    if K_ORD == 1 and A == 1:
        # p = B <= 128: BLOCK_R rows at once, Y = X @ S_B.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = (rows < R)[:, None]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + ib[None, :], mask=ok, other=0.0).to(tl.float32)
        y = _pm1_dot(x, s_b, True, IN_PIECES, UPCAST)
        tl.store(y_ptr + rows[:, None] * stride_yr + ib[None, :], (y * scale).to(y_ptr.dtype.element_ty), mask=ok)
    elif K_ORD == 1:
        # One row of p = A * B, element (i, j) of its [A, B] view at offset i * B + j: Y = S_A X S_B.
        row = tl.program_id(0)
        ia = tl.arange(0, A)
        offs = ia[:, None] * B + ib[None, :]
        x = tl.load(x_ptr + row * stride_xr + offs).to(tl.float32)
        t = _pm1_dot(x, _sylvester_block(ia, ia), False, IN_PIECES, UPCAST)
        y = _pm1_dot(t, s_b, True, PIECES, UPCAST)
        tl.store(y_ptr + row * stride_yr + offs, (y * scale).to(y_ptr.dtype.element_ty))
    else:
        # One row of n = K_ORD * p as [KP, p] (rows >= K_ORD are zeros): S_p on each sub-row, then
        # H_k^T across them (hk_ptr holds it, zero-padded to [KP, KP]).
        row = tl.program_id(0)
        ik = tl.arange(0, KP)
        ip = tl.arange(0, A * B)
        ok = (ik < K_ORD)[:, None]
        offs = ik[:, None] * (A * B) + ip[None, :]
        x = tl.load(x_ptr + row * stride_xr + offs, mask=ok, other=0.0).to(tl.float32)
        if A == 1:
            t = _pm1_dot(x, s_b, True, IN_PIECES, UPCAST)
        else:
            # [KP * A, B] @ S_B, then S_A along the A axis: bring it last, [KP * B, A] @ S_A, and back.
            t = _pm1_dot(tl.reshape(x, (KP * A, B)), s_b, True, IN_PIECES, UPCAST)
            t = tl.reshape(tl.permute(tl.reshape(t, (KP, A, B)), (0, 2, 1)), (KP * B, A))
            ia = tl.arange(0, A)
            t = _pm1_dot(t, _sylvester_block(ia, ia), True, PIECES, UPCAST)
            t = tl.reshape(tl.permute(tl.reshape(t, (KP, B, A)), (0, 2, 1)), (KP, A * B))
        hk = tl.load(hk_ptr + ik[:, None] * KP + ik[None, :])
        y = _pm1_dot(t, hk, False, PIECES, UPCAST)
        tl.store(y_ptr + row * stride_yr + offs, (y * scale).to(y_ptr.dtype.element_ty), mask=ok)


def _factors(p: int) -> tuple[int, int]:
    """``p -> (A, B)``: ``(1, p)`` up to 128, else two powers of two >= 16 with ``A * B = p``."""
    if p <= 128:
        return 1, p
    m = p.bit_length() - 1
    return 1 << (m // 2), 1 << (m - m // 2)


def padded_order(k: int) -> int:
    """Rows the fused kernel gives H_k: the next power of two, at least ``tl.dot``'s 16."""
    return max(16, 1 << (k - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _padded_hk(k: int, inverse: bool, device: torch.device) -> torch.Tensor:
    """``H_k^T`` (forward; ``H_k`` when inverse) as fp32 ``[KP, KP]``, zero-padded (cached: read only)."""
    kp = padded_order(k)
    return torch.nn.functional.pad(cached_hadamard_k(k, not inverse, torch.float32, device), (0, kp - k, 0, kp - k))


# bf16 rows are one exact bf16 piece, fp16 rows two, float32 rows three; intermediates are float32 sums,
# kept to two pieces for 16-bit outputs and three for float32 ones.
_PIECES = {torch.bfloat16: (1, 2), torch.float16: (2, 2), torch.float32: (3, 3)}


def _launch(x2: torch.Tensor, y2: torch.Tensor, scale: float, k: int, p: int, hk: torch.Tensor | None) -> None:
    R = x2.shape[0]
    a, b = _factors(p)
    in_pieces, pieces = _PIECES[x2.dtype]
    kp = padded_order(k) if k > 1 else 1
    block_r = 16 if k == 1 and a == 1 else 1
    if k == 1:
        warps = 4 if p <= 4096 else 8
    else:
        warps = 4 if kp * p <= 4096 else 8 if kp * p <= 8192 else 16
    _fwht_kernel[(cdiv(R, block_r),)](
        x2,
        y2,
        hk if hk is not None else x2,
        R,
        x2.stride(0),
        y2.stride(0),
        float(scale),
        K_ORD=k,
        KP=kp,
        A=a,
        B=b,
        BLOCK_R=block_r,
        IN_PIECES=in_pieces,
        PIECES=pieces,
        UPCAST=interpret_mode(),
        num_warps=warps,
    )


def _rows(x: torch.Tensor, n: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"out has shape {tuple(y.shape)}, expected {tuple(x.shape)}")
    return x2, y, y.view(-1, n)


def fwht_triton(x: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * (x @ S_n)`` over the last dim of ``x`` (power-of-two ``n``), in ``x.dtype``."""
    n = x.shape[-1]
    reason = triton_fwht_unsupported_reason(n=n, dtype=x.dtype)
    if reason:
        raise ValueError(f"triton FWHT: {reason}")
    x2, y, y2 = _rows(x, n, out)
    if x2.shape[0]:
        _launch(x2, y2, scale, 1, n, None)
    return y


def fused_unsupported_reason(n: int, device: torch.device | str | None = None) -> str | None:
    """None when one program takes a whole row of ``n = k * p`` (``k`` > 1) on ``device``, else why not."""
    k, p = split_size(n)
    if k == 1:
        return "a power of two (no H_k factor to fuse)"
    if device is not None and not interpret_mode() and cuda_arch(device) != 90:
        # compiled for sm_80 / sm_89 / sm_100 / sm_120 its row and H_k tiles spill 4-56 KB a thread to
        # local memory (benchmarks/triton_compile_check.py), on sm_90 at most 0.2 KB
        return "the fused kernel is for Hopper (sm_90): elsewhere it spills its row to local memory"
    kp = padded_order(k)
    if kp > FUSED_MAX_KP or kp * p > FUSED_MAX_ELEMENTS:
        return f"{k} * {p} padded to {kp} * {p} exceeds one program's registers"
    return None


def hadamard_triton(x: torch.Tensor, normalized: bool = True, inverse: bool = False) -> torch.Tensor:
    """``x @ H_n`` (``x @ H_n.T`` when ``inverse``) over the last dim, times ``1/sqrt(n)`` when
    ``normalized``, in ``x.dtype``: one kernel when ``n`` is a power of two or
    :func:`fused_unsupported_reason` allows, else the power-of-two kernel and then ``H_k`` in torch."""
    n = x.shape[-1]
    k, p = split_size(n)
    reason = triton_fwht_unsupported_reason(n=p, dtype=x.dtype)
    if reason:
        raise ValueError(f"triton Hadamard: {reason}")
    key = (n, x.dtype, x.device.type)
    if k > 1 and fused_unsupported_reason(n, x.device) is None and key not in FUSED_FAILED:
        x2, y, y2 = _rows(x, n, None)
        hk = _padded_hk(k, inverse, x2.device)  # outside the fallback: its errors are not the kernel's
        try:
            if x2.shape[0]:
                _launch(x2, y2, n**-0.5 if normalized else 1.0, k, p, hk)
            return y
        except Exception as exc:  # noqa: BLE001 - a Triton that cannot compile it keeps the two-step path
            # The fused kernel's reshapes and permutes are newer than the rest; a compiler that rejects
            # them (checked natively only by gpu_check.sh, whose test fails on this fallback) must not
            # take the model down with it. During CUDA-graph capture the error is the capture's: raise.
            if x2.is_cuda and torch.cuda.is_current_stream_capturing():
                raise
            FUSED_FAILED[key] = f"{type(exc).__name__}: {exc}"[:300]
            warnings.warn(f"fused Triton Hadamard of size {n} failed ({FUSED_FAILED[key]}); using two kernels",
                          RuntimeWarning, stacklevel=2)
    return with_hadamard_k(fwht_triton)(x, normalized, inverse)
