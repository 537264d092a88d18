"""What the weight-activation methods need to know about a block's inputs when several groups read
one of them (mixture-of-experts layers), and where each group's calibration statistics come from.

**Readers of a norm.** In a mixture-of-experts layer, ``post_attention_layernorm`` feeds the router,
every routed expert's gate/up and the shared expert's gate/up. A scale or rotation folded into that
norm changes what *all* of them read, so it is folded into every reader's weight columns at once, the
full-precision router's included (:func:`norm_readers`): the router then computes the same logits in
exact arithmetic and routes as before.

**Value rows.** LLaDA2's ``attention.query_key_value`` is one linear whose rows are q | k | v
(``LinearGroup.row_split``); only the v rows feed the attention output (:func:`value_rows`).

**Expert statistics** (:func:`collect_block_inputs`). A dense group's input statistics come from its
own inputs. A routed expert's come from the tokens the router sent it (``expert_calibration=routed``,
hooks on its linears) or from every token reaching the block (``all-tokens``, the default, as for the
weight-only methods: ``experts.AllTokenInputs``). An expert that received fewer than
``min_expert_tokens`` routed tokens falls back to the all-token statistics and is listed with the
reason; weight-activation methods have no RTN fallback, since their activations are quantized per
token at run time whatever the calibration saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..core.configs import CalibratedWeightOnlyConfig
from ..errors import ConfigError
from ..families import FamilyAdapter, LinearGroup
from .base import BlockCalibration, find_linear
from .capture import feed_inputs, require_inputs
from .experts import ALL_TOKENS, ROUTED, AllTokenInputs, expert_plan, uses_routed_statistics

VALUE_PART = "v"  # the part of a fused q/k/v linear whose rows feed the attention output


def expert_options(config: Any) -> CalibratedWeightOnlyConfig:
    """The expert-calibration options of a weight-activation config, as ``experts.expert_plan``
    reads them; the fallback is always the all-token statistics."""
    return CalibratedWeightOnlyConfig(
        expert_calibration=getattr(config, "expert_calibration", ALL_TOKENS),
        min_expert_tokens=getattr(config, "min_expert_tokens", 1),
        expert_fallback=ALL_TOKENS,
    )


def router_of(
    adapter: FamilyAdapter, block: nn.Module, groups: tuple[LinearGroup, ...]
) -> tuple[str, nn.Module] | None:
    """(the norm the router reads, the router module) for a block with routed experts, else None.

    The router stays in full precision; what is folded into its input must be folded into its
    ``weight`` ``[experts, hidden]`` (an ``nn.Linear`` or, in LLaDA2, a module holding the weight)."""
    norm = next((g.expert_input for g in groups if g.routed and g.expert_input), None)
    if adapter.router is None or norm is None or not adapter.router_norm_shared:
        return None  # no router, or one reading its own input (nothing of the experts' norm to fold)
    router = block.get_submodule(adapter.router)
    weight = getattr(router, "weight", None)
    hidden = block.get_submodule(norm).weight.shape[0]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden:
        raise ConfigError(
            f"the router {adapter.router} has no weight [experts, {hidden}] that the transform of its input "
            f"{norm} could be folded into",
            hint="use rtn-wa or a weight-only method (rtn, gptq, awq) for this model",
        )
    return norm, router


def norm_readers(block: nn.Module, groups: tuple[LinearGroup, ...], norm: str,
                 router: tuple[str, nn.Module] | None) -> tuple[list[nn.Linear], list[nn.Module]]:
    """(the quantized linears reading ``norm``, the full-precision modules reading it: the router)."""
    linears = [find_linear(block, name) for g in groups if g.norm == norm for name in g.linears]
    extra = [router[1]] if router is not None and router[0] == norm else []
    return linears, extra


def value_rows(adapter: FamilyAdapter, model_config: Any, groups: tuple[LinearGroup, ...],
               prev_linear: str) -> slice | None:
    """The rows of ``prev_linear`` that feed the attention output when it is a fused q/k/v linear
    (``row_split``); None when it is the value projection itself."""
    for group in groups:
        if prev_linear in group.linears and group.row_split:
            if VALUE_PART not in group.row_split:
                raise ValueError(f"{prev_linear} is split into {group.row_split}, with no {VALUE_PART} part")
            sizes = adapter.row_split_sizes(group, model_config)
            index = group.row_split.index(VALUE_PART)
            start = sum(sizes[:index])
            return slice(start, start + sizes[index])
    return None


class GroupInputStats:
    """Per-channel ``max|x|`` of a group's input and (optionally) a bounded sample of its tokens;
    ``count``: the tokens seen (empty inputs, which a routed expert may get, are ignored)."""

    def __init__(self, sample_tokens: int = 0, batches: int = 1):
        self.absmax: torch.Tensor | None = None
        self.rows_per_batch = -(-sample_tokens // max(batches, 1)) if sample_tokens else 0
        self.samples: list[torch.Tensor] = []
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.count += x.shape[0]
        m = x.abs().amax(0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if self.rows_per_batch:
            step = max(1, x.shape[0] // self.rows_per_batch)
            self.samples.append(x[::step][: self.rows_per_batch].cpu())

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.samples)


@dataclass
class BlockInputs:
    """Every group's input statistics, and the routed groups that fell back (group -> why)."""

    stats: dict[LinearGroup, GroupInputStats]
    fallbacks: dict[LinearGroup, str] = field(default_factory=dict)


@torch.no_grad()
def collect_block_inputs(
    block: nn.Module, groups: tuple[LinearGroup, ...], calib: BlockCalibration, config: Any, sample_tokens: int = 0
) -> BlockInputs:
    """Run ``block`` on the calibration inputs and record every group's input statistics; routed
    expert groups as the config's expert calibration says (module docstring)."""
    batches = len(calib)
    options = expert_options(config)
    stats: dict[LinearGroup, GroupInputStats] = {}
    hooked: dict[str, LinearGroup] = {}
    for group in groups:
        if uses_routed_statistics(options, group):
            stats[group] = GroupInputStats(sample_tokens, batches)
            hooked[group.linears[0]] = group
    modules = {name: block.get_submodule(name) for name in hooked}
    seen = feed_inputs(block, modules, calib, lambda name, x: stats[hooked[name]].add(x))
    require_inputs(seen, [name for name, group in hooked.items() if group.routed])

    result = BlockInputs(stats)
    every_token = AllTokenInputs(block, calib)
    norm_stats: dict[str, GroupInputStats] = {}  # gate/up of every expert reading a norm: one input
    for group in groups:
        if not group.routed:
            continue
        plan, reason = expert_plan(options, group, stats[group].count if group in stats else None)
        if plan == ROUTED:
            continue
        if reason is not None:
            result.fallbacks[group] = reason
        if group.norm is not None and group.norm == group.expert_input:
            if group.norm not in norm_stats:
                norm_stats[group.norm] = GroupInputStats(sample_tokens, batches)
                for x in every_token.of_norm(group.norm):
                    norm_stats[group.norm].add(x)
            stats[group] = norm_stats[group.norm]
        else:
            stats[group] = GroupInputStats(sample_tokens, batches)
            first = group.linears[0]
            every_token.feed(group, {first: block.get_submodule(first)}, lambda _, x, s=stats[group]: s.add(x))
    return result


@torch.no_grad()
def feed_group(block: nn.Module, group: LinearGroup, modules: dict[str, nn.Module], calib: BlockCalibration,
               config: Any, every_token: AllTokenInputs, consume) -> str | None:
    """Hand each of ``group``'s modules its calibration inputs (non-empty ones), routed or all-token
    as :func:`collect_block_inputs` decides; returns why a routed group fell back, or None."""
    options = expert_options(config)
    counts = {"tokens": 0}
    pending: list[tuple[str, torch.Tensor]] = []

    def keep(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0]:
            if name == group.linears[0]:
                counts["tokens"] += x.shape[0]
            pending.append((name, x))

    routed = None
    if uses_routed_statistics(options, group):
        seen = feed_inputs(block, modules, calib, keep if group.routed else consume)
        require_inputs(seen, list(modules) if group.routed else ())
        routed = counts["tokens"]
    if not group.routed:
        return None
    plan, reason = expert_plan(options, group, routed)
    if plan == ROUTED:
        for name, x in pending:
            consume(name, x)
    else:
        every_token.feed(group, modules, lambda name, x: consume(name, x) if x.numel() else None)
    return reason
