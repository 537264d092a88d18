"""The grouped mixture-of-experts path of a loaded checkpoint: every routed expert of a block in three
grouped expert GEMMs (``kernels/grouped_experts.py``) instead of the published per-expert loop.

After a checkpoint's weights load (a hook of ``hf_quantizer.py``), for every mixture-of-experts module
the family's :class:`~qdlm_export.families.base.ExpertDispatch` names:

* each projection's per-expert packed tensors are stacked once into ``[E, ...]`` tensors (gate and up
  into one ``[E, gate + up rows, ...]`` stack when their schemes are equal, so one GEMM reads the
  tokens once), and every expert's :class:`QdlmLinear` buffers become *views* into the stack: memory
  stays the packed size and the per-expert modules keep working (and keep their checkpoint names);
* the module's dispatch method (LLaDA2: ``moe_infer(x, topk_ids, topk_weight)``) or, for a module
  whose routing the family describes as data (LLaDA-MoE), its ``forward`` is replaced on the instance
  by the grouped computation: sort the token copies by expert, gate/up GEMM, ``act(gate) * up``, down
  GEMM, unsort, then weight and sum in the published dtype order.

The published loop stays in charge (and the module says why, ``GROUPED_SKIPPED``) when the experts'
linears are not all weight-only quantized linears of one scheme per projection (a fallback expert with
another scheme, a weight-activation checkpoint, biases), or when they are offloaded or on several
devices. If the experts are later replaced (``model.dequantize()``) the published code runs again; if
they move (``model.to(...)``), the stacks are rebuilt from the moved buffers on the next call.
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QdlmError
from ..families.base import ExpertDispatch
from ..families.registry import family_by_name
from ..format.spec import LinearSpec
from ..kernels.grouped_experts import grouped_expert_gemm
from ..kernels.registry import select_backend
from .hf_quantizer import QdlmLinear, add_after_load_hook

log = logging.getLogger(__name__)

GROUPED = "_qdlm_grouped"  # attribute of a module computing through the grouped path: its GroupedExperts
GROUPED_SKIPPED = "_qdlm_grouped_skipped"  # attribute of a module left on the published loop: why
_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point")


@dataclass
class StackedProjection:
    """One GEMM's weights: the stacked tensors of one or more projections of every expert (rows
    concatenated in ``parts`` order), and the modules whose buffers are views into them."""

    parts: tuple[str, ...]  # projection attribute names, e.g. ("gate_proj", "up_proj")
    rows: tuple[int, ...]  # output rows of each part
    bits: int
    group_size: int
    in_features: int
    modules: list[list[QdlmLinear]]  # [expert][part]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # suffix -> [E, sum(rows), ...]

    def stack(self) -> None:
        """(Re)build the stacks from the modules' current buffers and make those buffers views of them."""
        names = [n for n in _TENSORS if getattr(self.modules[0][0], n, None) is not None]
        self.tensors = {}
        for name in names:
            # the old buffers are released as their views replace them: one projection of extra memory at most
            first = torch.cat([getattr(m, name) for m in self.modules[0]])
            stacked = first.new_empty((len(self.modules), *first.shape))
            for e, parts in enumerate(self.modules):
                stacked[e] = torch.cat([getattr(m, name) for m in parts]) if e else first
                start = 0
                for module, rows in zip(parts, self.rows):
                    module._buffers[name] = stacked[e, start:start + rows]
                    start += rows
            self.tensors[name] = stacked

    def is_current(self) -> bool:
        """Whether the modules' buffers are still views of the stacks (not moved or replaced since)."""
        last = len(self.modules) - 1
        return all(
            getattr(self.modules[e][0], name, None) is not None
            and getattr(self.modules[e][0], name).data_ptr() == stacked[e].data_ptr()
            for name, stacked in self.tensors.items() for e in (0, last)
        )

    def __call__(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        return grouped_expert_gemm(x, offsets, t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"),
                                   self.bits, self.group_size, self.in_features)


@dataclass
class GroupedExperts:
    """The grouped computation of one mixture-of-experts module's routed experts."""

    module: nn.Module
    dispatch: ExpertDispatch
    experts: list[nn.Module]
    projections: list[StackedProjection]  # [gate+up] or [gate, up], then [down]
    calls: int = 0  # grouped passes run (tests and `inspect` read it)
    published_calls: int = 0  # passes left to the published loop (faster per-expert kernels, replaced experts)

    def expert_mlp(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``down(act(gate(x)) * up(x))`` of every row's expert, rows sorted by expert."""
        if not all(p.is_current() for p in self.projections):
            for p in self.projections:
                p.stack()
        *gate_up, down = self.projections
        if len(gate_up) == 1:
            gu = gate_up[0](x_sorted, offsets)
            gate, up = gu.split(gate_up[0].rows, dim=-1)
        else:
            gate, up = gate_up[0](x_sorted, offsets), gate_up[1](x_sorted, offsets)
        act = getattr(self.experts[0], self.dispatch.activation)
        self.calls += 1
        return down(act(gate) * up, offsets)

    def grouped_here(self, x: torch.Tensor) -> bool:
        """Whether this pass takes the grouped path: the experts are still the stacked modules and
        :func:`prefers_grouped` holds for every projection on ``x``'s device and dtype."""
        if self.experts_unchanged() and all(
                prefers_grouped(x.device, x.dtype, p.modules[0][0].spec) for p in self.projections):
            return True
        self.published_calls += 1
        return False

    def experts_unchanged(self) -> bool:
        """False once the experts' linears are no longer the stacked modules (``dequantize()``)."""
        d = self.dispatch
        experts = self.module.get_submodule(d.experts)
        return all(getattr(experts[e], name) is module for p in self.projections
                   for e, parts in enumerate(p.modules) for name, module in zip(p.parts, parts))


def prefers_grouped(device: torch.device | str, dtype: torch.dtype, spec: LinearSpec) -> bool:
    """Whether the grouped op should compute these experts rather than the per-expert loop: yes when
    its backend is a grouped kernel (Triton), or when the per-expert linears would dequantize and
    multiply too (the grouped torch reference does the same work with less Python). No when the
    per-expert linears have kernels of their own that beat dequantizing (torch's packed CPU int4/int8
    kernels for bf16/fp16 models: measured 3-11x faster than dequantizing every expert with tokens)."""
    facts = {"K": spec.in_features, "N": spec.out_features, "bits": spec.bits, "group_size": spec.group_size,
             "symmetric": spec.symmetric, "dtype": dtype}
    if select_backend("grouped_expert_gemm", device, **facts).family != "torch":
        return True
    return select_backend("weight_only_linear", device, **facts).family == "torch"


def _sorted_by_expert(topk_ids: torch.Tensor, experts: int):
    """(order of the flattened (token, slot) pairs by expert, token of each sorted row, offsets [E+1])."""
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    offsets = torch.zeros(experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=experts).cumsum(0)
    return order, order // topk_ids.shape[1], offsets


@torch.no_grad()
def _grouped_dispatch(module: nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weight: torch.Tensor):
    """The published ``moe_infer(x, topk_ids, topk_weight)``, with the experts in grouped GEMMs:
    outputs unsorted to (token, slot), cast to the weights' dtype, weighted, summed over the slots and
    cast back."""
    grouped: GroupedExperts = getattr(module, GROUPED)
    if not grouped.grouped_here(x):
        return getattr(type(module), grouped.dispatch.method)(module, x, topk_ids, topk_weight)
    order, token, offsets = _sorted_by_expert(topk_ids, len(grouped.experts))
    outs = grouped.expert_mlp(x[token], offsets)
    unsorted = torch.empty_like(outs)
    unsorted[order] = outs
    mixed = unsorted.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(-1))
    return mixed.sum(dim=1).type(unsorted.dtype)


def _grouped_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts ``forward`` from the family's routing data (:class:`ExpertRouting`)."""
    grouped: GroupedExperts = getattr(module, GROUPED)
    if not grouped.grouped_here(hidden_states):
        return type(module).forward(module, hidden_states)
    routing = grouped.dispatch.routing
    shape = hidden_states.shape
    h = hidden_states.reshape(-1, shape[-1])
    weights = F.softmax(getattr(module, routing.router)(h), dim=1, dtype=torch.float)
    bias = getattr(module, routing.bias, None) if routing.bias else None
    if bias is not None:
        weights = weights + bias
    weights, selected = torch.topk(weights, int(getattr(module, routing.top_k)), dim=-1)
    if routing.normalize and getattr(module, routing.normalize, False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(h.dtype)
    order, token, offsets = _sorted_by_expert(selected, len(grouped.experts))
    outs = grouped.expert_mlp(h[token], offsets) * weights.reshape(-1)[order, None]
    # rows are in expert order, so each token sums its experts in the order the published loop does
    return torch.zeros_like(h).index_add_(0, token, outs.to(h.dtype)).reshape(shape)


class _Skip(Exception):
    """This module stays on the published loop (the message says why)."""


def _spec_problem(spec: LinearSpec) -> str | None:
    """Why a linear of this spec cannot be one of the grouped GEMM's experts (None: it can)."""
    if spec.has_bias:
        return "an expert linear has a bias"
    if spec.input_transforms or spec.activations:
        return "the experts quantize activations or transform inputs (a weight-activation checkpoint)"
    return None


def _scheme_key(spec: LinearSpec) -> tuple:
    """What every expert of one grouped GEMM must share."""
    return spec.bits, spec.group_size, spec.symmetric, spec.in_features, spec.scale_dtype


def _same_scheme(modules: list[QdlmLinear]) -> None:
    first = modules[0]
    for m in modules:
        problem = _spec_problem(m.spec)
        if problem:
            raise _Skip(problem)
        if (_scheme_key(m.spec), m.weight_scale.dtype, m.weight_packed.device) != (
                _scheme_key(first.spec), first.weight_scale.dtype, first.weight_packed.device):
            raise _Skip("the experts' schemes (or devices) differ")
        if any(t.is_meta for t in m.buffers()):
            raise _Skip("the experts are offloaded")


def _projection(experts: list[nn.Module], parts: tuple[str, ...]) -> StackedProjection:
    modules = [[getattr(expert, part, None) for part in parts] for expert in experts]
    if not all(isinstance(m, QdlmLinear) for row in modules for m in row):
        raise _Skip(f"not every expert's {'/'.join(parts)} is a quantized linear")
    for i in range(len(parts)):
        _same_scheme([row[i] for row in modules])
    first = modules[0][0].spec
    return StackedProjection(parts, tuple(m.spec.out_features for m in modules[0]), first.bits, first.group_size,
                             first.in_features, modules)


def _same_projection_scheme(experts: list[nn.Module], a: str, b: str) -> bool:
    x, y = getattr(experts[0], a), getattr(experts[0], b)
    return isinstance(x, QdlmLinear) and isinstance(y, QdlmLinear) and (
        _scheme_key(x.spec), x.weight_scale.dtype) == (_scheme_key(y.spec), y.weight_scale.dtype)


def group_module(module: nn.Module, dispatch: ExpertDispatch) -> GroupedExperts:
    """Stack ``module``'s experts and route its dispatch through the grouped path (raises ``_Skip``)."""
    experts = list(module.get_submodule(dispatch.experts))
    if not experts:
        raise _Skip("no experts")
    if dispatch.method is not None and not callable(getattr(type(module), dispatch.method, None)):
        raise _Skip(f"{type(module).__name__} has no method {dispatch.method!r}")
    if dispatch.method is None and (dispatch.routing is None or dispatch.routing.score != "softmax"):
        raise _Skip("the family describes no dispatch method and no routing the loader knows")
    if _same_projection_scheme(experts, dispatch.gate, dispatch.up):
        gate_up = [_projection(experts, (dispatch.gate, dispatch.up))]
    else:
        gate_up = [_projection(experts, (dispatch.gate,)), _projection(experts, (dispatch.up,))]
    projections = [*gate_up, _projection(experts, (dispatch.down,))]
    devices = {p.modules[0][0].weight_packed.device for p in projections}
    if len(devices) > 1:
        raise _Skip("the experts' projections are on several devices")
    for p in projections:
        p.stack()
    grouped = GroupedExperts(module, dispatch, experts, projections)
    setattr(module, GROUPED, grouped)
    if dispatch.method is not None:
        setattr(module, dispatch.method, types.MethodType(_grouped_dispatch, module))
    else:
        module.forward = types.MethodType(_grouped_forward, module)
    return grouped


def group_experts(model: nn.Module, qconfig: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The after-load hook: every mixture-of-experts module of the family's blocks onto the grouped path
    where it can run. Returns module name -> ``"grouped"`` or the reason it kept the published loop."""
    try:
        adapter = family_by_name(str(qconfig.get("family")))
    except QdlmError:
        return {}
    dispatch = adapter.expert_dispatch
    blocks_path = adapter.blocks
    if prefix and blocks_path.startswith(prefix + "."):
        blocks_path = blocks_path[len(prefix) + 1:]
    if dispatch is None:
        return {}
    try:
        blocks = model.get_submodule(blocks_path)
    except AttributeError:
        return {}
    paths: dict[str, str] = {}
    for index, block in enumerate(blocks):
        name = f"{blocks_path}.{index}.{dispatch.module}"
        try:
            module = block.get_submodule(dispatch.module)
            module.get_submodule(dispatch.experts)
        except AttributeError:
            continue  # a dense block
        try:
            group_module(module, dispatch)
            paths[name] = "grouped"
        except _Skip as why:
            setattr(module, GROUPED_SKIPPED, str(why))
            paths[name] = f"published per-expert loop: {why}"
            log.info("%s keeps the per-expert loop: %s", name, why)
    return paths


def expert_paths(model: nn.Module) -> dict[str, str]:
    """Which path each mixture-of-experts module of a loaded model computes with, and how often the
    grouped one ran: module name -> ``"grouped (N passes)"`` or ``"published per-expert loop: why"``."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, GROUPED, None), GroupedExperts):
            grouped = getattr(module, GROUPED)
            found[name] = f"grouped ({grouped.calls} passes, {grouped.published_calls} on the published loop)"
        elif isinstance(getattr(module, GROUPED_SKIPPED, None), str):
            found[name] = f"published per-expert loop: {getattr(module, GROUPED_SKIPPED)}"
    return found


def planned_paths(specs: Mapping[str, LinearSpec], family: str | None) -> dict[str, str]:
    """What loading would choose, from the checkpoint's config alone (``inspect``): each routed expert
    linear -> ``"grouped over N experts"`` or ``"published per-expert loop: why"``."""
    try:
        adapter = family_by_name(str(family))
    except QdlmError:
        return {}
    d = adapter.expert_dispatch
    if d is None:
        return {}
    pattern = re.compile(rf"({re.escape(adapter.blocks)}\.\d+\.{re.escape(d.module)}\.{re.escape(d.experts)})"
                         rf"\.(\d+)\.({re.escape(d.gate)}|{re.escape(d.up)}|{re.escape(d.down)})")
    found: dict[str, dict[int, dict[str, LinearSpec]]] = {}
    for name, spec in specs.items():
        match = pattern.fullmatch(name)
        if match:
            found.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = spec
    paths = {}
    for experts_path, experts in found.items():
        why = _planned_problem(experts, (d.gate, d.up, d.down))
        text = f"grouped over {len(experts)} experts" if why is None else f"published per-expert loop: {why}"
        paths.update({f"{experts_path}.{e}.{proj}": text for e, projs in experts.items() for proj in projs})
    return paths


def _planned_problem(experts: dict[int, dict[str, LinearSpec]], projections: tuple[str, ...]) -> str | None:
    for proj in projections:
        specs = [experts.get(e, {}).get(proj) for e in range(max(experts) + 1)]
        if any(spec is None for spec in specs):
            return f"not every expert's {proj} is a quantized linear"
        problem = next((p for p in map(_spec_problem, specs) if p), None)
        if problem:
            return problem
        if len({_scheme_key(spec) for spec in specs}) > 1:
            return "the experts' schemes differ"
    return None


add_after_load_hook(group_experts)
