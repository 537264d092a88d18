"""AWQ (Lin et al., 2023): protect the weight channels that meet large activations by scaling them up
before quantization, and fold the inverse scale into the op that produces those activations.

Per block, for each adapter group (linears sharing one input) in forward order:

1. **Capture** the group's input on every calibration batch (a hook on its first linear): the
   per-channel mean ``|x|``, the Gram matrix ``G = X^T X / n`` and a few sampled tokens.
2. **Scale search.** For ``alpha`` on a ``grid``-point grid in ``[0, 1)``: ``s = mean|x|^alpha``,
   normalised by ``sqrt(max(s) * min(s))``; every linear of the group is quantized as ``Q(W s) / s``
   (RTN with the scheme) and the error of the group's own outputs on the captured inputs,
   ``mean ||(W_q - W) x||^2 = trace(D G D^T) / out``, is measured; the best ``s`` is kept.
   ``alpha = 0`` is ``s = 1`` (plain RTN), so the chosen scale never does worse than RTN on the
   group's outputs. *Choice:* the study (llm-awq) judges the q/k/v scales on the output of the whole
   attention (for LLaDA: the whole block); we judge every group on its own linears' outputs, which
   needs no knowledge of the family's forward and is exact over all calibration tokens through ``G``.
3. **Fold** ``1/s`` offline into the op feeding the group: the norm's weight (and bias) for a norm-fed
   group, the previous linear's output rows (weight and bias) for a linear-fed one. A previous linear
   whose output size differs from the group's input size (``v -> o`` under grouped-query attention)
   cannot take the scale; that pair is skipped, as llm-awq does.
4. **Clip search** (``clip_search``) per linear: for every (output row, group) the range shrink
   ``p = 1 - i/clip_grid`` down to ``1 - max_shrink`` whose quantized weight gives the least error of
   that group's partial output ``w_g . x_g`` on ``clip_tokens`` sampled tokens (all tokens, through
   ``G``'s diagonal blocks, when ``clip_tokens`` is None). The query/key projections are skipped by
   default (``clip_skip_qk``), as in llm-awq.

Finally every listed linear is quantized (scales from ``compute_qparams(..., clip_ratio=p)``) and the
block is left computing with the dequantized weights. Search and folding run in float32 on master
copies of the linears; the block stays in full precision until the end, so each group's inputs are
those of the (folded) full-precision block, as in llm-awq.

The block's norm weights and the previous linears' biases are modified in place: an exporter must
take them from the block after :meth:`AWQ.quantize_block`, not from the source checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core.configs import CalibratedWeightOnlyConfig
from ..core.schemes import QuantizedWeight, WeightScheme, compute_qparams, dequantize, quantize_with_qparams
from ..errors import ConfigError
from ..families import FamilyAdapter, LinearGroup
from .base import BlockCalibration, QuantMethod, find_linear, qualified
from .capture import feed_inputs, require_inputs
from .experts import ALL_TOKENS, RTN, AllTokenInputs, expert_plan, uses_routed_statistics
from .folding import fold_scale, feeder_problem
from .registry import register_method

__all__ = [
    "AWQ",
    "AWQConfig",
    "InputStats",
    "capture_group_input",
    "query_key_linears",
    "search_clip",
    "search_scale",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig(CalibratedWeightOnlyConfig):
    """AWQ with the study's settings by default: asymmetric, group 128, 20-point grids."""

    method: ClassVar[str] = "awq"

    symmetric: bool = False  # llm-awq's zero_point=True
    grid: int = 20  # alpha candidates k/grid, k = 0..grid-1
    clip_search: bool = True
    clip_grid: int = 20  # shrink step 1/clip_grid
    max_shrink: float = 0.5  # smallest range kept: 1 - max_shrink
    clip_tokens: int | None = 512  # tokens sampled for the clip search; None: all (exact, via the Gram)
    clip_skip_qk: bool = True  # no clip search for the query/key projections (llm-awq)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1:
            raise ConfigError(f"-O grid={self.grid} is invalid", hint="-O grid accepts an integer >= 1, such as 20")
        if self.clip_grid < 1:
            raise ConfigError(f"-O clip_grid={self.clip_grid} is invalid", hint="-O clip_grid accepts an integer >= 1, such as 20")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"-O max_shrink={self.max_shrink} is invalid", hint="-O max_shrink accepts a fraction in [0, 1), such as 0.5")
        if self.clip_tokens is not None and self.clip_tokens <= 0:
            raise ConfigError(
                f"-O clip_tokens={self.clip_tokens} is invalid", hint="-O clip_tokens accepts an integer >= 1 such as 512, or none for all"
            )


# ---- activation statistics -----------------------------------------------------------------------


class InputStats:
    """What the searches need of one group's input ``x [tokens, in]``, accumulated batch by batch."""

    def __init__(self, in_features: int, device: torch.device | str | None, sample_index: torch.Tensor | None):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # sum x x^T
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0
        self.sample_index = sample_index  # global token indices to keep (sorted), or None
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.gram.device, dtype=torch.float32)
        self.gram.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        if self.sample_index is not None:
            lo, hi = self.count, self.count + x.shape[0]
            idx = self.sample_index[(self.sample_index >= lo) & (self.sample_index < hi)] - lo
            self.samples.append(x[idx.to(x.device)])
        self.count += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def mean_gram(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)

    def sampled_tokens(self) -> torch.Tensor | None:
        return torch.cat(self.samples) if self.samples else None

    def divide_inputs(self, s: torch.Tensor) -> None:
        """The statistics of ``x / s`` (after ``1/s`` was folded into the op feeding the group)."""
        inv = 1.0 / s
        self.gram.mul_(inv.unsqueeze(0) * inv.unsqueeze(1))
        self.abs_sum.mul_(inv.double())
        self.samples = [t * inv for t in self.samples]


def _sample_index(num_tokens: int, k: int | None, device: torch.device | str | None) -> torch.Tensor | None:
    if k is None:
        return None
    return torch.linspace(0, num_tokens - 1, min(k, num_tokens), device=device).round().long().unique()


@torch.no_grad()
def capture_group_input(
    block: nn.Module, first_linear: nn.Linear, calib: BlockCalibration, clip_tokens: int | None,
    may_be_silent: bool = False,
) -> InputStats:
    """Statistics of the input of ``first_linear`` (the group's shared input) over the calibration.
    ``may_be_silent``: a routed expert's, which may receive no token (then ``count == 0``)."""
    num_tokens = sum(h.numel() // h.shape[-1] for h in calib.hidden)
    stats = InputStats(
        first_linear.in_features,
        first_linear.weight.device,
        _sample_index(num_tokens, clip_tokens, first_linear.weight.device),
    )
    seen = feed_inputs(block, {"group input": first_linear}, calib, lambda _, x: stats.add_batch(x))
    require_inputs(seen, ["group input"] if may_be_silent else ())
    return stats


@torch.no_grad()
def every_token_stats(every_token: AllTokenInputs, group: LinearGroup, first_linear: nn.Linear,
                      clip_tokens: int | None) -> InputStats:
    """Statistics of the input of a routed expert group's ``first_linear`` when its expert is run on
    every token reaching the mixture-of-experts block (all-tokens calibration)."""
    inputs = every_token.of_norm(group.expert_input)
    num_tokens = sum(x.numel() // x.shape[-1] for x in inputs)
    device = first_linear.weight.device
    stats = InputStats(first_linear.in_features, device, _sample_index(num_tokens, clip_tokens, device))
    every_token.feed(group, {group.linears[0]: first_linear}, lambda _, x: stats.add_batch(x))
    return stats


# ---- searches (pure functions) -------------------------------------------------------------------


def _output_error(D: torch.Tensor, gram: torch.Tensor, rows_per_chunk: int = 4096) -> float:
    """``trace(D G D^T)``: summed squared output error of weight error ``D`` on inputs with Gram ``G``."""
    total = 0.0
    for chunk in D.split(rows_per_chunk):
        total += ((chunk @ gram) * chunk).sum().item()
    return total


def _pseudo_quantize(w: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype, clip=1.0) -> torch.Tensor:
    scale, zero = compute_qparams(w, scheme, scale_dtype, clip_ratio=clip)
    return dequantize(quantize_with_qparams(w, scale, zero, scheme), scale, zero, scheme)


@torch.no_grad()
def search_scale(
    weights: list[torch.Tensor],
    schemes: list[WeightScheme],
    x_abs_mean: torch.Tensor,
    gram: torch.Tensor,
    *,
    grid: int = 20,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float, list[float]]:
    """The per-input-channel scale ``s`` minimising the group's output error; returns (s, alpha, losses).

    ``weights`` are float32 ``[out_i, in]`` sharing the input whose mean ``|x|`` and mean Gram are given.
    Losses are mean squared output errors, one per alpha ``k/grid``.
    """
    total_out = sum(w.shape[0] for w in weights)
    base = x_abs_mean.float().clamp(min=0)
    best = (math.inf, torch.ones_like(base), 0.0)
    losses = []
    for k in range(grid):
        alpha = k / grid
        s = base.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, scheme in zip(weights, schemes):
            D = _pseudo_quantize(w * s, scheme, scale_dtype) / s - w
            loss += _output_error(D, gram)
        loss /= total_out
        losses.append(loss)
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2], losses


def _group_grams(
    scheme: WeightScheme, in_features: int, gram: torch.Tensor | None, tokens: torch.Tensor | None
) -> torch.Tensor:
    """``[groups, k, k]``: the Gram matrix of each input group (diagonal blocks of ``X^T X / n``)."""
    k = scheme.effective_group_size(in_features)
    n = in_features // k
    if tokens is not None:
        xg = tokens.float().reshape(-1, n, k).transpose(0, 1)  # [groups, T, k]
        return xg.transpose(1, 2) @ xg / max(tokens.shape[0], 1)
    assert gram is not None
    return gram.reshape(n, k, n, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    group_grams: torch.Tensor,
    scheme: WeightScheme,
    *,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype = torch.float32,
    rows_per_chunk: int = 1024,
) -> torch.Tensor:
    """Per (row, group) range shrink ``[out, groups]`` minimising each group's partial-output error.

    Candidates are ``1 - i/clip_grid`` for ``i = 0 .. floor(max_shrink * clip_grid)``; the error of a
    candidate is ``d^T G_g d`` with ``d`` the quantization error of that row's group ``g``.
    """
    out_features, in_features = w.shape
    k = scheme.effective_group_size(in_features)
    n = in_features // k
    steps = math.floor(max_shrink * clip_grid + 1e-9)
    best_err = torch.full((out_features, n), math.inf, device=w.device)
    best_ratio = torch.ones(out_features, n, device=w.device)
    for i in range(steps + 1):
        p = 1 - i / clip_grid
        D = (_pseudo_quantize(w, scheme, scale_dtype, clip=p) - w).reshape(out_features, n, k)
        err = torch.empty(out_features, n, device=w.device)
        for r0 in range(0, out_features, rows_per_chunk):
            d = D[r0 : r0 + rows_per_chunk].transpose(0, 1)  # [groups, rows, k]
            err[r0 : r0 + rows_per_chunk] = ((d @ group_grams) * d).sum(-1).t()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, p), best_ratio)
    return best_ratio


def query_key_linears(adapter: FamilyAdapter) -> set[str]:
    """The query/key projections, read from the adapter's structure (not from names): the linears
    sharing an input with the value projection -- the ``prev_linear`` of the attention-output group --
    other than the value projection itself."""
    values = {g.prev_linear for g in adapter.groups if g.role == "attn_out" and g.prev_linear}
    found: set[str] = set()
    for group in adapter.groups:
        shared = values.intersection(group.linears)
        if shared:
            found.update(n for n in group.linears if n not in shared)
    return found


def _shared_norms(groups: tuple[LinearGroup, ...]) -> set[str]:
    """Norms a group's own scale cannot be folded into: those feeding several groups (every expert
    and the shared expert of a mixture-of-experts layer), or routed experts (the router reads the
    same norm), since the fold would change what the other readers compute."""
    counts: dict[str, int] = {}
    for group in groups:
        if group.norm is not None:
            counts[group.norm] = counts.get(group.norm, 0) + 1
    return {norm for norm, n in counts.items() if n > 1} | {g.norm for g in groups if g.routed and g.norm}


# ---- the method ----------------------------------------------------------------------------------


@register_method
class AWQ(QuantMethod):
    """Activation-aware scaling and clipping, then round-to-nearest with the found scales/clips."""
    display_name = "AWQ"

    name = "awq"
    config_class = AWQConfig
    needs_calibration = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Per block prefix and group: what was found (alpha, losses vs RTN), for logs and metadata.
        self.search_log: dict[str, dict] = {}

    def quantize_groups(
        self, block: nn.Module, prefix: str, groups: tuple[LinearGroup, ...], calib: BlockCalibration | None
    ) -> dict[str, QuantizedWeight]:
        masters, clips = self.search_and_fold(block, prefix, calib, groups)
        results: dict[str, QuantizedWeight] = {}
        for name in (name for group in groups for name in group.linears):
            linear = find_linear(block, name)
            full_name = qualified(prefix, name)
            scheme = self.layer_scheme(full_name, linear.in_features)
            w = masters.pop(name)
            scale, zero = compute_qparams(w, scheme, self.scale_dtype, clip_ratio=clips.pop(name, 1.0))
            codes = quantize_with_qparams(w, scale, zero, scheme)
            qweight = QuantizedWeight(
                codes=codes,
                scale=scale,
                zero_point=None if scheme.symmetric else zero.to(torch.uint8),
                scheme=scheme,
                bias=linear.bias,
            )
            self.load_quantized(linear, qweight)
            results[full_name] = qweight
        return results

    @torch.no_grad()
    def search_and_fold(
        self, block: nn.Module, prefix: str, calib: BlockCalibration | None,
        groups: tuple[LinearGroup, ...] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Search and fold every group's scale and search the clips, leaving the block in full
        precision (computing as before, up to float rounding).

        Returns the scaled float32 weights of every listed linear and the clip ratios ``[out, groups]``
        of those that were clip-searched. ``groups``: the adapter's by default.
        """
        if calib is None or len(calib) == 0:
            raise ValueError("AWQ needs calibration inputs for every block")
        cfg: AWQConfig = self.config  # type: ignore[assignment]
        groups = self.adapter.groups if groups is None else groups
        linears = {name: find_linear(block, name) for group in groups for name in group.linears}
        schemes = {name: self.layer_scheme(qualified(prefix, name), lin.in_features) for name, lin in linears.items()}
        master = {name: lin.weight.data.float().clone() for name, lin in linears.items()}
        clips: dict[str, torch.Tensor] = {}
        no_clip = query_key_linears(self.adapter) if cfg.clip_skip_qk else set()
        shared = _shared_norms(groups)
        every_token = AllTokenInputs(block, calib)

        for group in groups:
            first = linears[group.linears[0]]
            in_features = first.in_features
            key = f"{prefix}:{group.role or ','.join(group.linears)}"
            stats = None
            if uses_routed_statistics(cfg, group):
                stats = capture_group_input(block, first, calib, cfg.clip_tokens, may_be_silent=group.routed)
            plan, reason = expert_plan(cfg, group, stats.count if stats is not None else None)
            if reason is not None:
                for name in group.linears:
                    self.calibration_fallbacks[qualified(prefix, name)] = f"{plan}: {reason}"
            if plan == RTN:  # an expert with too few routed calibration tokens: plain RTN
                self.search_log[key] = {"skipped": reason}
                continue
            if plan == ALL_TOKENS:
                stats = every_token_stats(every_token, group, first, cfg.clip_tokens)
            if group.norm in shared:
                entry = {"skipped": f"{group.norm} also feeds other linears or the router; no scale folded"}
            else:
                entry = self._scale_group(block, group, master, schemes, stats)
            self.search_log[key] = entry

            if cfg.clip_search:
                tokens = stats.sampled_tokens()
                grams: dict[WeightScheme, torch.Tensor] = {}
                for name in group.linears:
                    if name in no_clip:
                        continue
                    scheme = schemes[name]
                    if scheme not in grams:
                        grams[scheme] = _group_grams(
                            scheme, in_features, None if tokens is not None else stats.mean_gram, tokens
                        )
                    clips[name] = search_clip(
                        master[name],
                        grams[scheme],
                        scheme,
                        clip_grid=cfg.clip_grid,
                        max_shrink=cfg.max_shrink,
                        scale_dtype=self.scale_dtype,
                    )
                del grams, tokens
            del stats
        return master, clips

    def _scale_group(
        self,
        block: nn.Module,
        group: LinearGroup,
        master: dict[str, torch.Tensor],
        schemes: dict[str, WeightScheme],
        stats: InputStats,
    ) -> dict:
        """Search, fold and apply the scale of one group; updates ``master``, the block and ``stats``.
        A group whose feeder cannot take a scale (``v -> o`` under GQA) is skipped, as llm-awq does."""
        cfg: AWQConfig = self.config  # type: ignore[assignment]
        problem = feeder_problem(block, group)
        if problem is not None:
            logger.info("AWQ: %s; pair skipped", problem)
            return {"skipped": problem}
        s, alpha, losses = search_scale(
            [master[name] for name in group.linears],
            [schemes[name] for name in group.linears],
            stats.abs_mean,
            stats.mean_gram,
            grid=cfg.grid,
            scale_dtype=self.scale_dtype,
        )
        s = fold_scale(block, group, s, master)
        stats.divide_inputs(s)
        return {"alpha": alpha, "loss": min(losses), "rtn_loss": losses[0]}
