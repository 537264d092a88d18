"""The GPTQ solver (Frantar et al., 2022) for one weight matrix: quantize column by column and push
each column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ``||W X^T - W_hat X^T||^2``.

* :func:`factor_hessian` -- dead inputs, dampening, activation order and the triangular factor ``R``
  of ``H = R R^T``: everything GPTQ takes from a Hessian. Linears that read the same input (q/k/v,
  gate/up) share one factor and are solved as one stacked matrix (rows are independent in GPTQ).
* :func:`gptq_quantize` -- the blocked column loop (:class:`_ColumnLoop`). It returns a
  :class:`QuantizedWeight` whose codes are exactly those its stored scales/zeros produce, so
  ``dequantize`` gives back the weight GPTQ chose.

Group parameters and activation order. Without ``act_order`` columns are visited in their natural
order and a group's scale/zero are computed when the loop reaches its first column, from the weights
as already updated by the error feedback (the paper's choice). With ``act_order`` columns are visited
by decreasing ``H_ii``; scales/zeros of *every* group are then computed up front on the unpermuted
weight ("static groups"), so each stored group is still a contiguous run of original columns and the
checkpoint needs no ``g_idx``.

Cost, and why it is computed this way (LLaDA-8B block shapes, CPU): the paper's loop needs the
upper Cholesky factor ``U`` of ``H^-1``, classically a Cholesky, ``cholesky_inverse`` and a second
Cholesky (about n^3 multiply-adds; LAPACK's ``cholesky_inverse`` also ran 14x slower (CPU time) with 2 threads
than with 1 on a shared 2-core machine). ``U = R^-1`` for the reversed Cholesky factor ``R``
(``R = J chol(J H J) J``, ``J`` the reversal), and the loop can run on ``R`` directly (see
:class:`_ColumnLoop`): one Cholesky, n^3/3, and no inverse. What is left is the column loop's
``out * in^2 / 2`` multiply-adds of error propagation, as large matrix products.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..core.schemes import (
    QuantizedWeight,
    WeightScheme,
    compute_qparams,
    quantize_with_qparams,
)

__all__ = ["HessianFactor", "factor_hessian", "gptq_quantize"]

@dataclass
class HessianFactor:
    """What the column loop needs from a Hessian ``H [in, in]``, computed once per distinct input."""

    R: torch.Tensor  # upper triangular, R R^T = P (H + damp * mean(diag H) * I) P^T, float32
    dead: torch.Tensor  # bool [in]: inputs that were zero on every calibration token
    perm: torch.Tensor | None  # act-order visiting order (None: natural order)
    damp: float  # the dampening actually used (raised if the requested one was not enough)


def _reverse_cholesky(handed: list[torch.Tensor], diag_mean: float, damp: float, max_tries: int = 8
                      ) -> tuple[torch.Tensor, float]:
    """``R`` upper-triangular with ``R R^T = H + damp*diag_mean*I``, and the damp used, from
    ``Hr = J H J`` (rows and columns reversed; float32, overwritten), handed over as the one item of
    ``handed`` so that it is freed as soon as its factor exists: ``R = J chol(Hr) J``, reversed in
    place. If the dampened ``H`` is not positive definite (numerically), the dampening is raised
    tenfold at a time, with a warning."""
    Hr = handed.pop()
    if not math.isfinite(diag_mean):
        raise ValueError("the Hessian has non-finite entries (NaN/inf in the calibration activations?)")
    current, added = damp, 0.0
    for _ in range(max_tries):
        Hr.diagonal().add_((current - added) * diag_mean)
        added = current
        L, info = torch.linalg.cholesky_ex(Hr)
        if info.item() == 0:
            del Hr
            R = _half_turn_(L)
            if not torch.isfinite(R).all():
                raise RuntimeError("GPTQ: the Hessian factor has non-finite entries")
            if current != damp:
                warnings.warn(
                    f"GPTQ: Hessian not positive definite with damp={damp}; used damp={current:g}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return R, current
        del L
        current = current * 10 if current > 0 else 1e-4
    raise RuntimeError(f"GPTQ: the Hessian stays singular even with damp={current / 10:g}")


def _half_turn_(M: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``M.flip(0, 1)`` in place (``M[i, j] <- M[n-1-i, n-1-j]``), a block of ``rows`` at a time:
    a second n x n copy is 600 MB at n = 12288."""
    n = M.shape[0]
    for a in range(0, n // 2, rows):
        b = min(a + rows, n // 2)
        top = M[a:b].flip(0, 1)
        M[a:b] = M[n - b:n - a].flip(0, 1)
        M[n - b:n - a] = top
    if n % 2:
        M[n // 2] = M[n // 2].flip(0)
    return M


def factor_hessian(H: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> HessianFactor:
    """Factor ``H [in, in]`` for :func:`gptq_quantize` (``H`` itself is not modified).

    Memory: a caller that hands over its only reference to ``H`` (as GPTQ's stages do, through
    :meth:`HessianAccumulator.release`) lets it be freed once its reversed copy exists, and that copy
    once its factor exists, so at most two ``in x in`` float32 matrices are alive at a time (five were,
    3 GB at LLaDA-8B's 12288-wide down projection). Hence no ``@torch.no_grad()`` decorator here: its
    wrapper would hold the argument for the whole call."""
    with torch.no_grad():
        H = H.detach()
        diag = torch.diag(H).to(torch.float32)
        # Inputs that were always zero carry no information: H_ii = 1 keeps H invertible (their weight
        # columns are zeroed by the solve: they multiply zeros on the calibration data anyway).
        dead = diag == 0
        diag[dead] = 1
        perm = torch.argsort(diag, descending=True) if act_order else None
        # One copy, already in the reversed (and act-order) arrangement the factorization wants.
        if perm is None:
            Hr = H.flip(0, 1).to(torch.float32)
            del H
            Hr.diagonal()[dead.flip(0)] = 1
        else:
            order = perm.flip(0)
            Hr = H.index_select(0, order).to(torch.float32)
            del H
            Hr = Hr.index_select(1, order)
            Hr.diagonal()[dead[order]] = 1
        handed = [Hr]
        del Hr
        R, used = _reverse_cholesky(handed, torch.mean(diag).item(), damp)
        return HessianFactor(R=R, dead=dead, perm=perm, damp=used)


def _qparams(
    w: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype,
    mse_clip: bool,
    mse_grid: int,
    mse_max_shrink: float,
    mse_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``[out]`` (scale_dtype) and zero ``[out]`` (float) of one group of columns ``w [out, k]``.

    With ``mse_clip`` the range is shrunk by ``p = 1 - i/grid`` (``i < max_shrink*grid``) and each
    row keeps the ``p`` with the least ``sum |w - w_hat|^norm`` (the GPTQ/QuaRot ``mse`` option).
    """
    row_scheme = WeightScheme(bits=scheme.bits, group_size=-1, symmetric=scheme.symmetric)
    if not mse_clip:
        scale, zero = compute_qparams(w, row_scheme, scale_dtype)
        return scale[:, 0], zero[:, 0]
    return _mse_search(w.float().contiguous(), scheme, scale_dtype, int(mse_max_shrink * mse_grid), mse_grid, mse_norm)


_MSE_CHUNK = 1 << 18  # weights searched together: 1 MiB of float32, so every candidate's passes stay in L2


def _mse_search(w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype, candidates: int, grid: int,
                norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``mse`` clip search of :func:`_qparams` over the rows of ``w [rows, k]`` (float32,
    contiguous), with the arithmetic of ``compute_qparams`` and ``quantize_with_qparams`` (the same
    scales and zero points bit for bit), cache-blocked: a chunk of rows goes through every candidate
    while it is in cache, and ``clamp(round(w / s), -z, max - z)`` stands for ``clamp(round(w / s) + z,
    0, max) - z`` (integers in float32: equal). The power (``norm`` 2.4) is most of what is left."""
    rows, k = w.shape
    scale = torch.empty(rows, dtype=scale_dtype, device=w.device)
    zero = torch.empty(rows, dtype=torch.float32, device=w.device)
    step = max(1, _MSE_CHUNK // max(k, 1))
    for r0 in range(0, rows, step):
        wc = w[r0 : r0 + step]
        w_min = wc.amin(dim=1).clamp(max=0)
        w_max = wc.amax(dim=1).clamp(min=0)
        buf = torch.empty_like(wc)
        best_err = torch.full((wc.shape[0],), float("inf"), device=w.device)
        best_scale = torch.empty(wc.shape[0], dtype=scale_dtype, device=w.device)
        best_zero = torch.empty(wc.shape[0], dtype=torch.float32, device=w.device)
        for i in range(candidates):
            p = 1 - i / grid
            lo, hi = w_min * p, w_max * p
            if scheme.symmetric:
                s = torch.maximum(lo.abs(), hi) / (scheme.max_code / 2)
            else:
                s = (hi - lo) / scheme.max_code
            s = torch.where(s > 0, s, torch.ones_like(s)).to(scale_dtype)
            sf = s.float()
            if scheme.symmetric:
                z = torch.full_like(sf, float(scheme.symmetric_zero))
            else:
                z = torch.clamp(torch.round(-lo / sf), 0, scheme.max_code)
            torch.div(wc, sf[:, None], out=buf).round_()
            if scheme.symmetric:
                buf.clamp_(-scheme.symmetric_zero, scheme.max_code - scheme.symmetric_zero)
            else:  # maximum then minimum: clamp's per-row tensor bounds cost 2.5x as much
                torch.minimum(torch.maximum(buf, (-z)[:, None], out=buf), (scheme.max_code - z)[:, None], out=buf)
            err = buf.mul_(sf[:, None]).sub_(wc).abs_().pow_(norm).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            best_zero = torch.where(better, z, best_zero)
        scale[r0 : r0 + step], zero[r0 : r0 + step] = best_scale, best_zero
    return scale, zero


def _aligned_block_size(block_size: int, group: int) -> int:
    """A multiple of the group size near ``block_size``: every group then lies inside one block, so
    when it starts its columns as updated so far are all at hand."""
    return max(1, block_size // group) * group


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | HessianFactor,
    scheme: WeightScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    mse_clip: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
    mse_grid: int = 100,
    mse_max_shrink: float = 0.8,
    mse_norm: float = 2.4,
) -> QuantizedWeight:
    """Quantize ``W [out, in]`` given the Hessian ``H [in, in]`` of its inputs, or its
    :func:`factor_hessian` (then ``damp`` is the factor's; neither ``W`` nor ``H`` is modified).

    Returns codes, scales (``scale_dtype``) and, for asymmetric schemes, zero points such that
    ``dequantize`` reproduces exactly the weight the error feedback was computed against.
    """
    scheme.validate()
    out_features, cols = W.shape
    factor = H if isinstance(H, HessianFactor) else None
    h_shape = tuple((factor.R if factor is not None else H).shape)
    if h_shape != (cols, cols):
        raise ValueError(f"Hessian shape {h_shape} does not match weight input size {cols}")
    group = scheme.effective_group_size(cols)
    if cols % group:
        raise ValueError(f"group size {group} does not divide the input size {cols}")
    n_groups = cols // group
    if act_order and not static_groups and n_groups > 1:
        raise ValueError("act_order without static_groups needs a g_idx, which QuantizedWeight does not carry")
    if factor is None:
        factor = factor_hessian(H.to(W.device), damp, act_order)
    elif (factor.perm is not None) != act_order:
        raise ValueError(f"the Hessian factor was made with act_order={not act_order}, the solve asks act_order={act_order}")

    # Read-only from here on (the column loop works on its own transposed copy), so a float32 W is
    # not copied unless dead columns must be zeroed: at LLaDA-8B's stacked gate/up (24576 x 4096)
    # every copy is 400 MB.
    W = W.detach().to(torch.float32)
    if bool(factor.dead.any()):
        W = W.clone()
        W[:, factor.dead] = 0

    qargs = (scheme, scale_dtype, mse_clip, mse_grid, mse_max_shrink, mse_norm)
    scale = torch.ones(out_features, n_groups, dtype=scale_dtype, device=W.device)
    zero = torch.zeros(out_features, n_groups, dtype=torch.float32, device=W.device)
    # Per-channel schemes and act-order groups: all qparams up front, on the unpermuted weight.
    static = n_groups == 1 or act_order
    if static:
        for g in range(n_groups):
            scale[:, g], zero[:, g] = _qparams(W[:, g * group : (g + 1) * group], *qargs)

    perm = factor.perm
    col_group = (perm if perm is not None else torch.arange(cols, device=W.device)) // group
    # The column loop works on a transposed copy, so that "column j" is a contiguous row and the
    # rank-1 error updates are in-place ``addr_`` calls: several times faster on CPU than column
    # slices of a row-major W, with identical arithmetic.
    Wt = W.t().index_select(0, perm) if perm is not None else W.t().contiguous()
    del W
    codes_t = torch.empty(cols, out_features, dtype=torch.uint8, device=Wt.device)
    bs = block_size if static else _aligned_block_size(block_size, group)
    loop = _ColumnLoop(Wt, factor.R, codes_t, scale, zero, col_group.tolist(), static, group, scheme.max_code, qargs)
    loop.run(bs)
    del loop, Wt
    codes = codes_t.t()
    codes = codes[:, torch.argsort(perm)] if perm is not None else codes.contiguous()
    zero_point = None if scheme.symmetric else zero.to(torch.uint8)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero_point, scheme=scheme, bias=bias)


@contextmanager
def _threads(n: int, device: torch.device):
    """``n`` intra-op threads on CPU for the ``with`` body (GPUs: unchanged)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _ColumnLoop:
    """Quantize column by column (rows of ``Wt``), spreading each rounding error over later columns.

    The textbook loop pushes each block's errors onto every later column through rows of
    ``U = chol(H^-1)``. Here each block *pulls* the updates of all earlier blocks at once from their
    final rounding errors ``D = W - W_hat`` and the factor ``R`` of ``H = R R^T`` itself: with
    ``U = R^-1`` the scaled errors are ``E = D R``, and ``E_<b U_<b,b = -D_<b R_<b,b U_bb``, so

        W~_b = W_b + D_<b R_<b,b U_bb,    U_bb = R_bb^-1 (one small triangular inverse per block)

    -- the same arithmetic in exact terms, the same number of multiply-adds as the pushes, and no
    inverse of ``H`` at all (that inverse was a third of the solve at LLaDA-8B shapes). Within a block
    the columns push to each other through ``U_bb``, as in the paper.

    The per-column steps are thousands of small, latency-bound vector ops: on CPU they run on one
    thread (intra-op threads only add synchronisation: 4x slower with 2 threads than with 1 on a
    2-core machine, measured). The pull is one large matrix product per block and keeps the caller's
    threads.
    """

    def __init__(self, Wt, R, codes_t, scale, zero, col_group, static, group, max_code, qargs):
        self.Wt, self.R, self.codes_t, self.scale, self.zero = Wt, R, codes_t, scale, zero
        self.col_group, self.static, self.group, self.max_code, self.qargs = col_group, static, group, max_code, qargs

    def run(self, bs: int) -> None:
        Wt, R = self.Wt, self.R
        cols = Wt.shape[0]
        gemm_threads = torch.get_num_threads()
        with _threads(1, Wt.device):
            Q1 = torch.empty(min(bs, cols), Wt.shape[1], dtype=torch.float32, device=Wt.device)
            Qd1, err = torch.empty_like(Q1), torch.empty_like(Q1[0])
            for i1 in range(0, cols, bs):
                i2 = min(i1 + bs, cols)
                W_b = Wt[i1:i2].clone()  # the original columns, for D once they are quantized
                eye = torch.eye(i2 - i1, dtype=R.dtype, device=R.device)
                U_bb = torch.linalg.solve_triangular(R[i1:i2, i1:i2], eye, upper=True)
                if i1 > 0:  # everything the earlier blocks' errors do to this one, in one product
                    with _threads(gemm_threads, Wt.device):
                        pulled = torch.mm(R[:i1, i1:i2].t(), Wt[:i1])  # rows < i1 of Wt hold D
                    Wt[i1:i2].addmm_(U_bb.t(), pulled)
                    del pulled
                self._block(i1, i2, U_bb, Q1[: i2 - i1], Qd1[: i2 - i1], err)
                self.codes_t[i1:i2] = Q1[: i2 - i1].to(torch.uint8)
                torch.sub(W_b, Qd1[: i2 - i1], out=Wt[i1:i2])  # D of this block

    def _block(self, i1: int, i2: int, U_bb: torch.Tensor, Q1: torch.Tensor, Qd1: torch.Tensor,
               err: torch.Tensor) -> None:
        W1 = self.Wt[i1:i2]  # [block cols, out], updated in place
        diagonal = U_bb.diagonal().tolist()
        current_group, s, z = -1, None, None
        for i in range(i2 - i1):
            j = i1 + i
            g = self.col_group[j]
            if not self.static and j % self.group == 0:
                # A group starts: its columns as updated so far (the whole group is in this block).
                self.scale[:, g], self.zero[:, g] = _qparams(W1[i : i + self.group].t(), *self.qargs)
                current_group = -1
            if g != current_group:
                current_group, s, z = g, self.scale[:, g].float(), self.zero[:, g]
            w = W1[i]
            # Same arithmetic as quantize_with_qparams / dequantize, so stored codes reproduce w_hat.
            q = torch.div(w, s, out=Q1[i]).round_().add_(z).clamp_(0, self.max_code)
            w_hat = torch.sub(q, z, out=Qd1[i]).mul_(s)
            torch.sub(w, w_hat, out=err).div_(diagonal[i])  # (w - w_hat) / U_jj
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(U_bb[i, i + 1 :], err, alpha=-1)
