"""GPTQ (Frantar et al., 2022): quantize a linear column by column and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ``||W X^T - W_hat X^T||^2``.

The pieces, in the paper's order:

* :class:`HessianAccumulator` -- ``H = 2/n sum_t x_t x_t^T`` over the calibration tokens a linear
  sees, kept as a running average in float32 (fed by a forward hook on the linear).
* :func:`gptq_quantize` -- dead inputs, dampening, the upper Cholesky factor of ``H^-1``, then the
  blocked column loop with lazy batch updates. It returns a :class:`QuantizedWeight` whose codes are
  exactly those its stored scales/zeros produce, so ``dequantize`` gives back the weight GPTQ chose.
* :class:`GPTQ` -- the method: per block, Hessians of one adapter group are collected with the
  earlier groups already quantized ("true sequential"), that group is quantized, and so on.

Group parameters and activation order. Without ``act_order`` columns are visited in their natural
order and a group's scale/zero are computed when the loop reaches its first column, from the weights
as already updated by the error feedback (the paper's choice). With ``act_order`` columns are visited
by decreasing ``H_ii``; scales/zeros of *every* group are then computed up front on the unpermuted
weight ("static groups"), so each stored group is still a contiguous run of original columns and the
checkpoint needs no ``g_idx``. ``act_order`` without static groups would need a ``g_idx`` the
on-disk format does not have, and is refused by :class:`GPTQConfig`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Collection

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..core.configs import CalibratedWeightOnlyConfig
from ..errors import ConfigError
from ..core.schemes import QuantizedWeight, WeightScheme, compute_qparams, quantize_with_qparams
from ..families import LinearGroup
from .base import BlockCalibration, QuantMethod, find_linear, qualified
from .capture import feed_inputs, require_inputs
from .experts import ALL_TOKENS, RTN, AllTokenInputs, expert_plan, uses_routed_statistics
from .registry import register_method

__all__ = ["GPTQ", "GPTQConfig", "HessianAccumulator", "collect_hessians", "gptq_quantize"]


@dataclass(frozen=True)
class GPTQConfig(CalibratedWeightOnlyConfig):
    """GPTQ with the study's settings by default (symmetric, group 128, damp 0.01, no act-order)."""

    method: ClassVar[str] = "gptq"

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy-batch block
    act_order: bool = False  # visit columns by decreasing H_ii ("desc_act")
    static_groups: bool = True  # with act_order: group qparams fixed up front on the unpermuted W
    mse_clip: bool = False  # search each group's range shrink for the least |W - W_hat|^2.4
    true_sequential: bool = True  # collect each group's Hessians with the earlier groups quantized

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.damp >= 0 and math.isfinite(self.damp)):
            raise ConfigError(f"--damp {self.damp} is invalid", hint="use a small non-negative fraction such as 0.01")
        if self.block_size <= 0:
            raise ConfigError(f"-O block_size={self.block_size} is invalid", hint="-O block_size accepts an integer >= 1, such as 128")
        if self.act_order and not self.static_groups and self.group_size != -1:
            raise ConfigError(
                "act_order without static_groups needs a per-column group index (g_idx), which this "
                "checkpoint format does not store",
                hint="keep static_groups=True (the default) with act_order, or use per-channel scales "
                "(--group-size -1)",
            )


# ---- Hessians ------------------------------------------------------------------------------------


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` (float32) of the inputs one linear sees."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.H.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        # Rescale the old average, then add the new tokens with weight 2/total: H stays 2/n X^T X.
        self.H.mul_(self.nsamples / total)
        x = x * math.sqrt(2.0 / total)
        self.H.addmm_(x.t(), x)
        self.nsamples = total


@torch.no_grad()
def collect_hessians(
    block: nn.Module, linears: dict[str, nn.Linear], calib: BlockCalibration, may_be_silent: Collection[str] = ()
) -> dict[str, HessianAccumulator]:
    """Run ``block`` over every calibration batch and return each named linear's Hessian (each
    batch's forward stops once all of them have seen their input: ``capture.feed_inputs``).
    ``may_be_silent`` linears (routed experts) may see no token: their Hessian has ``nsamples == 0``."""
    accs = {name: HessianAccumulator(lin.in_features, device=lin.weight.device) for name, lin in linears.items()}
    require_inputs(feed_inputs(block, linears, calib, lambda name, x: accs[name].add_batch(x)), may_be_silent)
    return accs


# ---- the GPTQ solver -----------------------------------------------------------------------------


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float, max_tries: int = 8) -> torch.Tensor:
    """``U`` upper-triangular with ``U^T U = (H + damp*mean(diag H)*I)^-1``.

    If the dampened ``H`` is not positive definite (numerically), the dampening is raised tenfold at a
    time, with a warning, instead of failing.
    """
    diag_mean = torch.mean(torch.diag(H)).item()
    if not math.isfinite(diag_mean):
        raise ValueError("the Hessian has non-finite entries (NaN/inf in the calibration activations?)")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    current = damp
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + (current * diag_mean) * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                if current != damp:
                    warnings.warn(
                        f"GPTQ: Hessian not positive definite with damp={damp}; used damp={current:g}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return U
        current = current * 10 if current > 0 else 1e-4
    raise RuntimeError(f"GPTQ: the Hessian stays singular even with damp={current / 10:g}")


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
    scale, zero = compute_qparams(w, row_scheme, scale_dtype)
    if not mse_clip:
        return scale[:, 0], zero[:, 0]
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    for i in range(int(mse_max_shrink * mse_grid)):
        p = 1 - i / mse_grid
        s_p, z_p = compute_qparams(w, row_scheme, scale_dtype, clip_ratio=p)
        q = quantize_with_qparams(w, s_p, z_p, row_scheme).float()
        err = ((q - z_p) * s_p.float() - w).abs_().pow_(mse_norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better.unsqueeze(1), s_p, scale)
        zero = torch.where(better.unsqueeze(1), z_p, zero)
    return scale[:, 0], zero[:, 0]


def _aligned_block_size(block_size: int, group: int) -> int:
    """A block size such that every group either lies inside one block or starts at a block start.

    Then, when a group starts, its columns as updated so far are all at hand (lazy updates from
    earlier blocks are applied at block boundaries).
    """
    if block_size >= group:
        return (block_size // group) * group
    return block_size if group % block_size == 0 else group


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
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
    """Quantize ``W [out, in]`` given the Hessian ``H [in, in]`` of its inputs (neither is modified).

    Returns codes, scales (``scale_dtype``) and, for asymmetric schemes, zero points such that
    ``dequantize`` reproduces exactly the weight the error feedback was computed against.
    """
    scheme.validate()
    out_features, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight input size {cols}")
    group = scheme.effective_group_size(cols)
    if cols % group:
        raise ValueError(f"group size {group} does not divide the input size {cols}")
    n_groups = cols // group
    if act_order and not static_groups and n_groups > 1:
        raise ValueError("act_order without static_groups needs a g_idx, which QuantizedWeight does not carry")

    W = W.detach().to(torch.float32, copy=True)
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)

    # Inputs that were always zero carry no information: fix H_ii so H stays invertible and zero the
    # weight column (it multiplies zeros on the calibration data anyway).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    qargs = (scheme, scale_dtype, mse_clip, mse_grid, mse_max_shrink, mse_norm)
    scale = torch.ones(out_features, n_groups, dtype=scale_dtype, device=W.device)
    zero = torch.zeros(out_features, n_groups, dtype=torch.float32, device=W.device)
    # Per-channel schemes and act-order groups: all qparams up front, on the unpermuted weight.
    static = n_groups == 1 or act_order
    if static:
        for g in range(n_groups):
            scale[:, g], zero[:, g] = _qparams(W[:, g * group : (g + 1) * group], *qargs)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    col_group = (perm if perm is not None else torch.arange(cols, device=W.device)) // group
    col_group = col_group.tolist()

    Hinv = _upper_cholesky_of_inverse(H, damp)
    del H

    # The column loop works on transposed copies, so that "column j" is a contiguous row and the
    # rank-1 error updates are in-place ``addr_`` calls (no temporaries): several times faster on
    # CPU than column slices of a row-major W, with identical arithmetic.
    Wt = W.t().contiguous()
    del W
    codes_t = torch.zeros(cols, out_features, dtype=torch.uint8, device=Wt.device)
    max_code = scheme.max_code
    bs = block_size if static else _aligned_block_size(block_size, group)
    with _single_thread_on_cpu(Wt.device):
        _column_loop(Wt, Hinv, codes_t, scale, zero, col_group, static, group, bs, max_code, qargs)
    del Hinv, Wt
    codes = codes_t.t().contiguous()

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    zero_point = None if scheme.symmetric else zero.to(torch.uint8)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero_point, scheme=scheme, bias=bias)


@contextmanager
def _single_thread_on_cpu(device: torch.device):
    """The column loop is thousands of small, latency-bound ops: on CPU, intra-op threads only add
    synchronisation (4x slower with 2 threads than with 1 on a 2-core machine, measured)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _column_loop(Wt, Hinv, codes_t, scale, zero, col_group, static, group, bs, max_code, qargs) -> None:
    """Quantize column by column (rows of ``Wt``), spreading each rounding error over later columns."""
    cols = Wt.shape[0]
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = Wt[i1:i2].clone()  # [block cols, out]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = col_group[j]
            if not static and j % group == 0:
                # A group starts: its columns as updated so far (the whole group is in this block, or
                # it starts the block, when Wt itself is up to date).
                current = Wt[j : j + group] if i == 0 else W1[i : i + group]
                scale[:, g], zero[:, g] = _qparams(current.t(), *qargs)
            w = W1[i]
            s = scale[:, g].float()
            z = zero[:, g]
            # Same arithmetic as quantize_with_qparams / dequantize, so stored codes reproduce w_hat.
            q = torch.clamp(torch.round(w / s) + z, 0, max_code)
            codes_t[j] = q.to(torch.uint8)
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        # Lazy batch update of every later column with this block's errors.
        if i2 < cols:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)


# ---- the method ----------------------------------------------------------------------------------


@register_method
class GPTQ(QuantMethod):
    """GPTQ over a block, one adapter group at a time (true sequential) in forward order."""
    display_name = "GPTQ"

    name = "gptq"
    config_class = GPTQConfig
    needs_calibration = True

    def quantize_groups(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        if calib is None or len(calib) == 0:
            raise ValueError("GPTQ needs calibration inputs for every block")
        cfg: GPTQConfig = self.config  # type: ignore[assignment]
        if cfg.true_sequential:
            stages = [group.linears for group in groups]
        else:
            stages = [tuple(name for group in groups for name in group.linears)]

        routed = {name for group in groups if group.routed for name in group.linears}
        group_of = {name: group for group in groups for name in group.linears}
        every_token = AllTokenInputs(block, calib)
        results: dict[str, QuantizedWeight] = {}
        for names in stages:
            linears = {name: find_linear(block, name) for name in names}
            # Earlier stages are already quantized in place, so these inputs are what the
            # quantized model will feed this group (an expert's: the tokens routed to it).
            captured = {n: linears[n] for n in names if uses_routed_statistics(cfg, group_of[n])}
            hessians = collect_hessians(block, captured, calib, may_be_silent=routed) if captured else {}
            plans = {}
            for name in names:
                acc = hessians.get(name)
                plans[name] = expert_plan(cfg, group_of[name], acc.nsamples if acc is not None else None)
            hessians.update(self._all_token_hessians(every_token, group_of, linears, plans))
            for name in names:
                linear = linears[name]
                full_name = qualified(prefix, name)
                scheme = self.layer_scheme(full_name, linear.in_features)
                plan, reason = plans[name]
                if plan == RTN:  # an expert with too few routed calibration tokens
                    hessians.pop(name, None)
                    results[full_name] = self.fall_back_to_rtn(linear, full_name, scheme, reason)
                    continue
                if reason is not None:
                    self.calibration_fallbacks[full_name] = f"{plan}: {reason}"
                acc = hessians.pop(name)
                qweight = gptq_quantize(
                    linear.weight.data,
                    acc.H,
                    scheme,
                    damp=cfg.damp,
                    block_size=cfg.block_size,
                    act_order=cfg.act_order,
                    static_groups=cfg.static_groups,
                    mse_clip=cfg.mse_clip,
                    scale_dtype=self.scale_dtype,
                    bias=linear.bias,
                )
                del acc  # in x in float32: free before the next linear's solve
                self.load_quantized(linear, qweight)
                results[full_name] = qweight
        return results

    @staticmethod
    def _all_token_hessians(every_token: AllTokenInputs, group_of: dict[str, LinearGroup],
                            linears: dict[str, nn.Linear], plans: dict[str, tuple[str, str | None]]
                            ) -> dict[str, HessianAccumulator]:
        """Hessians of the linears whose plan is all-tokens: their expert run on every token."""
        wanted = [name for name, (plan, _) in plans.items() if plan == ALL_TOKENS]
        accs = {n: HessianAccumulator(linears[n].in_features, device=linears[n].weight.device) for n in wanted}
        for group in dict.fromkeys(group_of[n] for n in wanted):
            modules = {n: linears[n] for n in group.linears if n in accs}
            every_token.feed(group, modules, lambda name, x: accs[name].add_batch(x))
        return accs
