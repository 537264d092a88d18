"""GPTQ (Frantar et al., 2022) as a method: per block, the Hessians of the linears' inputs, then the
solver of ``gptq_solver.py`` (dead inputs, dampening, activation order, the Cholesky factor of
``H^-1``, the blocked column loop) on each linear.

* :class:`HessianAccumulator` -- ``H = 2/n sum_t x_t x_t^T`` over the calibration tokens a linear
  sees, kept as a running average in float32 (fed by a forward hook on the linear).
* :func:`collect_hessians` -- one calibration pass over a block; linears that are handed the very
  same input tensor (q/k/v, gate/up) share one accumulator, so their Hessian is accumulated once,
  factored once and they are solved as one stacked matrix.
* :class:`GPTQ` -- the method: per block, Hessians of one adapter group are collected with the
  earlier groups already quantized ("true sequential"), that group is quantized, and so on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.configs import CalibratedWeightOnlyConfig
from ..core.schemes import QuantizedWeight
from ..errors import ConfigError
from ..families import LinearGroup
from .base import BlockCalibration, QuantMethod, find_linear, qualified
from .capture import feed_inputs, require_inputs
from .experts import (
    ALL_TOKENS,
    RTN,
    AllTokenInputs,
    expert_plan,
    uses_routed_statistics,
)
from .gptq_solver import HessianFactor, factor_hessian, gptq_quantize
from .registry import register_method

__all__ = ["GPTQ", "GPTQConfig", "HessianAccumulator", "HessianFactor", "collect_hessians", "factor_hessian",
           "gptq_quantize"]


@dataclass(frozen=True)
class GPTQConfig(CalibratedWeightOnlyConfig):
    """GPTQ: symmetric, group 128, damp 0.01, block 128 by default, and activation order with static
    groups (llm-compressor's default too; lower held-out error than natural order in every scheme
    measured, docs/benchmarks.md, at no cost to the on-disk layout)."""

    method: ClassVar[str] = "gptq"

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy-batch block
    act_order: bool = True  # visit columns by decreasing H_ii ("desc_act"), with static groups
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
    """Running ``H = 2/n sum x x^T`` (float32) of the inputs one linear sees.

    ``H`` is symmetric, so each batch adds only the blocks on and below the diagonal (one product per
    block column: about half the multiply-adds of ``x^T x``, 1.5-1.8x faster on a CPU core at widths
    1024-4096); reading :attr:`H` copies the lower triangle onto the upper one."""

    BLOCK = 256  # columns per product: narrower blocks waste less above the diagonal, wider run faster

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._mirrored = True
        self.nsamples = 0

    @property
    def H(self) -> torch.Tensor:
        if not self._mirrored:
            n, b = self._H.shape[0], self.BLOCK
            for start in range(0, n, b):
                stop = min(start + b, n)
                self._H[start:stop, stop:].copy_(self._H[stop:, start:stop].t())
            self._mirrored = True
        return self._H

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._H, self._mirrored = value, True

    def release(self) -> torch.Tensor:
        """:attr:`H`, handed over: the accumulator keeps an empty tensor, so the caller's reference is
        the only one (``factor_hessian`` frees it while factoring)."""
        H = self.H
        self._H = H.new_empty(0)
        return H

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self._H.device, dtype=torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        # Rescale the old average, then add the new tokens with weight 2/total: H stays 2/n X^T X.
        self._H.mul_(self.nsamples / total)
        x = x * math.sqrt(2.0 / total)
        n, b = x.shape[1], self.BLOCK
        for start in range(0, n, b):  # the block column [start:, start:stop], diagonal block whole
            stop = min(start + b, n)
            self._H[start:, start:stop].addmm_(x[:, start:].t(), x[:, start:stop])
        self._mirrored = False
        self.nsamples = total


_MAX_STACKED_ROWS = 3 * 12288  # LLaDA-8B's gate+up (2 x 12288 rows) in one solve


class _InputsDiverged(Exception):
    """Linears that shared an input on one batch were handed different inputs on another."""


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    # ``a`` is held alive by the caller, so an equal data pointer cannot be a reused allocation;
    # the version counter catches an in-place change between the two calls.
    return (a is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device and a._version == b._version)


class _SharedHessians:
    """A ``consume(name, x)`` for ``feed_inputs``: the k-th input of a linear that is the very tensor
    another linear received as its k-th input (q/k/v read one normed hidden state) is accumulated
    once, into an accumulator the two share. A linear whose inputs later differ from its partners'
    raises :class:`_InputsDiverged` (the caller collects again, unshared)."""

    def __init__(self, linears: dict[str, nn.Module], share: bool):
        self.linears, self.share = linears, share
        self.accs: dict[str, HessianAccumulator] = {}
        self.count = {name: 0 for name in linears}
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        k = self.count[name]
        acc = self.accs.get(name)
        if acc is None:
            partner = next((m for m in self.accs if self.share and self.count[m] == 1 and k == 0
                            and _same_tensor(self.last.get(m), x)), None)
            if partner is not None:
                self.accs[name] = self.accs[partner]
            else:
                linear = self.linears[name]
                acc = self.accs[name] = HessianAccumulator(linear.in_features, device=linear.weight.device)
                acc.add_batch(x)
        else:
            done = [m for m in self.accs if m != name and self.accs[m] is acc and self.count[m] == k + 1]
            if any(not _same_tensor(self.last.get(m), x) for m in done):
                raise _InputsDiverged(name)
            if not done:
                acc.add_batch(x)
        self.last[name] = x
        self.count[name] = k + 1

    def result(self) -> dict[str, HessianAccumulator]:
        for name, acc in self.accs.items():
            if any(self.accs[m] is acc and self.count[m] != self.count[name] for m in self.accs):
                raise _InputsDiverged(name)
        self.last.clear()
        return self.accs


def _accumulate(linears: dict[str, nn.Module], run: Callable[[Callable[[str, torch.Tensor], None]], None]
                ) -> dict[str, HessianAccumulator]:
    """Hessians of ``linears`` from one pass ``run(consume)``, shared between linears fed the same
    tensors; should that sharing not hold on every batch, a second pass without it."""
    try:
        consumer = _SharedHessians(linears, share=True)
        run(consumer)
        return consumer.result()
    except _InputsDiverged:
        consumer = _SharedHessians(linears, share=False)
        run(consumer)
        return consumer.result()


@torch.no_grad()
def collect_hessians(
    block: nn.Module, linears: dict[str, nn.Linear], calib: BlockCalibration, may_be_silent: Collection[str] = ()
) -> dict[str, HessianAccumulator]:
    """Run ``block`` over every calibration batch and return each named linear's Hessian (each
    batch's forward stops once all of them have seen their input: ``capture.feed_inputs``).
    Linears fed the same tensor get the same accumulator object. ``may_be_silent`` linears (routed
    experts) may see no token: their Hessian has ``nsamples == 0``."""
    seen: dict[str, int] = {}

    def run(consume):
        seen.update(feed_inputs(block, linears, calib, consume))

    accs = _accumulate(linears, run)
    require_inputs(seen, may_be_silent)
    for name, linear in linears.items():  # a linear the forward never called
        accs.setdefault(name, HessianAccumulator(linear.in_features, device=linear.weight.device))
    return accs


# ---- the method ----------------------------------------------------------------------------------


@register_method
class GPTQ(QuantMethod):
    """GPTQ over a block, one adapter group at a time (true sequential) in forward order."""
    display_name = "GPTQ"

    name = "gptq"
    config_class = GPTQConfig
    needs_calibration = True
    reuses_linear_outputs = True  # it only loads quantized weights, and reports them stage by stage

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
            solved = self._solve_stage(prefix, names, linears, hessians, plans)
            for name in names:  # in forward order, as the adapter lists them
                linear, full_name = linears[name], qualified(prefix, name)
                plan, reason = plans[name]
                if plan == RTN:  # an expert with too few routed calibration tokens
                    scheme = self.layer_scheme(full_name, linear.in_features)
                    results[full_name] = self.fall_back_to_rtn(linear, full_name, scheme, reason)
                    continue
                if reason is not None:
                    self.calibration_fallbacks[full_name] = f"{plan}: {reason}"
                self.load_quantized(linear, solved[name])
                results[full_name] = solved.pop(name)
            calib.linears_changed(linears.values())
        return results

    def _solve_stage(self, prefix: str, names: tuple[str, ...], linears: dict[str, nn.Linear],
                     hessians: dict[str, HessianAccumulator], plans: dict[str, tuple[str, str | None]]
                     ) -> dict[str, QuantizedWeight]:
        """GPTQ of a stage's linears. Linears with one Hessian (one input) and one scheme are solved
        as one matrix, their weights stacked by rows (GPTQ treats rows independently: each gets what it
        would alone, up to the float rounding of larger products), and every Hessian is factored once."""
        cfg: GPTQConfig = self.config  # type: ignore[assignment]
        solves: dict = {}  # (Hessian, scheme[, chunk]) -> linears
        for name in names:
            if plans[name][0] != RTN:
                scheme = self.layer_scheme(qualified(prefix, name), linears[name].in_features)
                solves.setdefault((id(hessians[name]), scheme), []).append(name)
        solves = {(key, scheme, i): chunk for (key, scheme), members in solves.items()
                  for i, chunk in enumerate(_row_chunks(members, linears))}
        users = {id(acc): sum(len(v) for (key, _, _), v in solves.items() if key == id(acc)) for acc in hessians.values()}
        factors: dict[int, HessianFactor] = {}
        solved: dict[str, QuantizedWeight] = {}
        for (key, scheme, _), members in solves.items():
            if key not in factors:
                # in x in float32 (600 MB at 12288): handed over, freed inside the factorization
                factors[key] = factor_hessian(hessians[members[0]].release(), cfg.damp, cfg.act_order)
            weights = [linears[n].weight.data for n in members]
            stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
            qweight = gptq_quantize(stacked, factors[key], scheme, block_size=cfg.block_size,
                                    act_order=cfg.act_order, static_groups=cfg.static_groups,
                                    mse_clip=cfg.mse_clip, scale_dtype=self.scale_dtype)
            del stacked
            for name, part in zip(members, _split_rows(qweight, [w.shape[0] for w in weights])):
                part.bias = linears[name].bias
                solved[name] = part
            users[key] -= len(members)
            if users[key] == 0:
                del factors[key]
        return solved

    @staticmethod
    def _all_token_hessians(every_token: AllTokenInputs, group_of: dict[str, LinearGroup],
                            linears: dict[str, nn.Linear], plans: dict[str, tuple[str, str | None]]
                            ) -> dict[str, HessianAccumulator]:
        """Hessians of the linears whose plan is all-tokens: their expert run on every token."""
        wanted = {name: linears[name] for name, (plan, _) in plans.items() if plan == ALL_TOKENS}

        def run(consume):
            for group in dict.fromkeys(group_of[n] for n in wanted):
                every_token.feed(group, {n: linears[n] for n in group.linears if n in wanted}, consume)

        accs = _accumulate(wanted, run) if wanted else {}
        return accs


def _row_chunks(members: list[str], linears: dict[str, nn.Linear]) -> list[list[str]]:
    """Consecutive runs of ``members`` of at most ``_MAX_STACKED_ROWS`` rows (or one linear): a stacked
    solve holds its weights in float32 (many experts sharing one Hessian would otherwise all be)."""
    chunks: list[list[str]] = [[]]
    rows = 0
    for name in members:
        n = linears[name].out_features
        if chunks[-1] and rows + n > _MAX_STACKED_ROWS:
            chunks.append([])
            rows = 0
        chunks[-1].append(name)
        rows += n
    return chunks


def _split_rows(qweight: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """The per-linear pieces of a solve over stacked weights."""
    if len(rows) == 1:
        return [qweight]
    zeros = qweight.zero_point.split(rows) if qweight.zero_point is not None else [None] * len(rows)
    return [QuantizedWeight(codes=c.contiguous(), scale=s.contiguous(), zero_point=None if z is None else z.contiguous(),
                            scheme=qweight.scheme)
            for c, s, z in zip(qweight.codes.split(rows), qweight.scale.split(rows), zeros)]
