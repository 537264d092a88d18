"""Power-of-two Walsh-Hadamard transform over the last dim, Triton backend.

    fwht_triton(x, scale=1.0, out=None) -> scale * (x @ S_n)     (S_n natural-order Sylvester, symmetric)

for ``16 <= n <= 16384`` (``hadamard.triton_fwht_unsupported_reason`` says why not). Non-power-of-two
sizes ``m * p`` are handled by the caller: this kernel on the power-of-two axis, then ``H_m``.

Instead of log2(n) butterfly passes, the kernel uses ``S_{ab} = S_a (x) S_b``: a row viewed as an
``[a, b]`` matrix ``X`` transforms to ``S_a X S_b``, two small matmuls on the tensor cores. The
Sylvester blocks are generated in registers (``S[i, j] = (-1)**popcount(i & j)``), nothing is read
but ``x``. Rows of ``n <= 128`` are batched ``BLOCK_R`` at a time as ``X [BLOCK_R, n] @ S_n``;
longer rows take one program each with ``a = 2**floor(m/2)``, ``b = 2**ceil(m/2)`` (both >= 16, so
both matmuls meet ``tl.dot``'s minimum size). Accumulation is fp32 (``ieee`` dots: fp32 data is not
truncated to tf32), the result is stored in the output's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import cdiv

from .hadamard import triton_fwht_unsupported_reason


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
def _fwht_kernel(
    x_ptr,
    y_ptr,
    R,
    stride_xr,
    stride_yr,
    scale,
    A: tl.constexpr,
    B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    ib = tl.arange(0, B)
    s_b = _sylvester_block(ib, ib)
    if A == 1:
        # n = B <= 128: BLOCK_R rows at once, Y = X @ S_B.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = (rows < R)[:, None]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + ib[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.dot(x, s_b, input_precision="ieee")
        tl.store(y_ptr + rows[:, None] * stride_yr + ib[None, :], (y * scale).to(y_ptr.dtype.element_ty), mask=ok)
    else:
        # One row of n = A * B, element (i, j) of its [A, B] view at offset i * B + j: Y = S_A X S_B.
        row = tl.program_id(0)
        ia = tl.arange(0, A)
        offs = ia[:, None] * B + ib[None, :]
        x = tl.load(x_ptr + row * stride_xr + offs).to(tl.float32)
        t = tl.dot(_sylvester_block(ia, ia), x, input_precision="ieee")
        y = tl.dot(t, s_b, input_precision="ieee")
        tl.store(y_ptr + row * stride_yr + offs, (y * scale).to(y_ptr.dtype.element_ty))


def fwht_triton(x: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * (x @ S_n)`` over the last dim of ``x`` (power-of-two ``n``), in ``x.dtype``."""
    n = x.shape[-1]
    reason = triton_fwht_unsupported_reason(n=n, dtype=x.dtype)
    if reason:
        raise ValueError(f"triton FWHT: {reason}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"out has shape {tuple(y.shape)}, expected {tuple(x.shape)}")
    y2 = y.view(-1, n)
    R = x2.shape[0]
    if R == 0:
        return y
    m = n.bit_length() - 1
    if n <= 128:
        a, b, block_r = 1, n, 16
        grid = (cdiv(R, block_r),)
    else:
        a, b, block_r = 1 << (m // 2), 1 << (m - m // 2), 1
        grid = (R,)
    _fwht_kernel[grid](
        x2,
        y2,
        R,
        x2.stride(0),
        y2.stride(0),
        float(scale),
        A=a,
        B=b,
        BLOCK_R=block_r,
        num_warps=4 if n <= 4096 else 8,
    )
    return y
