"""The unfused view of routed experts stored as 3-D parameters (:class:`~qdlm_export.families.base.FusedExperts`).

Quantization works on linears: a fused experts module (``gate_up`` [E, 2I, H], gate rows then up rows,
and ``down`` [E, H, I]) is replaced by :class:`UnfusedExperts`, whose expert ``e`` holds the linears
``gate`` [I, H], ``up`` [I, H] and ``down`` [H, I]; the expert templates of the family's groups then
resolve to ``<block>.experts.<e>.gate_proj`` ... as for a ``ModuleList`` of experts. The source model
serves the same view from the checkpoint (:func:`expert_slices`: one 2-D key per expert linear, a slice
of the stored 3-D tensor), and :func:`fuse` stacks per-expert tensors back into the stored layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import InputDataError
from ..families.base import FamilyAdapter, FusedExperts

# transformers' grouped_mm and batched_mm implementations weight each (token, expert) output in the
# routing weights' dtype and sum over the top-k slots before one cast; its eager loop adds each expert's
# weighted output, cast to the hidden dtype, in expert order. The view reproduces whichever the fused
# module would run (its config's ``_experts_implementation``; transformers' default is grouped_mm).
EAGER = "eager"
TOP_K_SUM = "top_k_sum"


def split_fused(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate [E, I, ...], up [E, I, ...], down)`` as views of the stored ``gate_up [E, 2I, ...]``
    (gate rows, then up rows) and ``down [E, H, ...]``. Trailing dimensions are kept, so packed or
    per-group tensors of a quantized layout split the same way."""
    if gate_up.dim() < 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up of shape {list(gate_up.shape)} is not [experts, 2 * intermediate, ...]")
    if down.shape[0] != gate_up.shape[0]:
        raise ValueError(f"gate_up holds {gate_up.shape[0]} experts but down {down.shape[0]}")
    rows = gate_up.shape[1] // 2
    return gate_up[:, :rows], gate_up[:, rows:], down


def fuse(
    gate: torch.Tensor | Sequence[torch.Tensor], up: torch.Tensor | Sequence[torch.Tensor],
    down: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`split_fused`: ``(gate_up [E, 2I, ...], down [E, H, ...])`` from stacked
    tensors or from one tensor per expert (in expert order)."""
    gate, up, down = (t if isinstance(t, torch.Tensor) else torch.stack(list(t)) for t in (gate, up, down))
    if gate.shape != up.shape:
        raise ValueError(f"gate {list(gate.shape)} and up {list(up.shape)} differ in shape")
    if down.shape[0] != gate.shape[0]:
        raise ValueError(f"gate holds {gate.shape[0]} experts but down {down.shape[0]}")
    return torch.cat([gate, up], dim=1), down


class UnfusedExpert(nn.Module):
    """One expert's MLP, ``down(act(gate(x)) * up(x))``, with the linears named by the spec."""

    def __init__(self, spec: FusedExperts, hidden: int, intermediate: int, act_fn: nn.Module, *,
                 device=None, dtype=None):
        super().__init__()
        self._names = (spec.gate, spec.up, spec.down_linear, spec.activation)
        kw = {"bias": False, "device": device, "dtype": dtype}
        setattr(self, spec.gate, nn.Linear(hidden, intermediate, **kw))
        setattr(self, spec.up, nn.Linear(hidden, intermediate, **kw))
        setattr(self, spec.down_linear, nn.Linear(intermediate, hidden, **kw))
        setattr(self, spec.activation, act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down, act = (getattr(self, name) for name in self._names)
        return down(act(gate(x)) * up(x))


class UnfusedExperts(nn.Module):
    """A fused experts module as ``E`` experts of linears: children ``"0"`` .. ``"E-1"``
    (:class:`UnfusedExpert`), indexable and iterable like a ``ModuleList``, with the fused module's
    ``forward(hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k])``.

    ``accumulate``: :data:`TOP_K_SUM` (transformers' default grouped_mm: the weighted outputs of a
    token's k experts summed in the routing weights' dtype, then cast) or :data:`EAGER` (its eager
    loop: each expert's weighted output cast to the hidden dtype and added in expert order)."""

    def __init__(self, spec: FusedExperts, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 *, accumulate: str = TOP_K_SUM, device=None, dtype=None):
        super().__init__()
        if accumulate not in (EAGER, TOP_K_SUM):
            raise ValueError(f"accumulate must be {EAGER!r} or {TOP_K_SUM!r}, got {accumulate!r}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.accumulate = accumulate
        for index in range(num_experts):
            self.add_module(str(index), UnfusedExpert(spec, hidden, intermediate, act_fn, device=device, dtype=dtype))

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> UnfusedExpert:
        if not -len(self) <= index < len(self):
            raise IndexError(f"expert {index} out of range ({len(self)} experts)")
        return self._modules[str(index % len(self))]

    def __iter__(self) -> Iterator[UnfusedExpert]:
        return iter(self._modules.values())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        if self.accumulate == EAGER:
            out = torch.zeros_like(hidden_states)
        else:
            dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
            out = hidden_states.new_zeros((tokens, top_k, hidden_states.shape[-1]), dtype=dtype)
        for expert in torch.unique(top_k_index).tolist():  # ascending: the order the eager loop adds in
            if expert >= len(self):  # an expert-parallel sentinel: no expert here
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            weighted = self[expert](hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            if self.accumulate == EAGER:
                out.index_add_(0, token_idx, weighted.to(out.dtype))
            else:
                out[token_idx, slot] = weighted.to(out.dtype)
        return out if self.accumulate == EAGER else out.sum(dim=1).to(hidden_states.dtype)


def accumulation_of(fused: nn.Module) -> str:
    """How the fused module adds up its experts: its config's experts implementation (transformers'
    ``@use_experts_implementation``); grouped_mm, transformers' default, when it names none."""
    config = getattr(fused, "config", None)
    implementation = getattr(config, "_experts_implementation", None) if config is not None else None
    # None: a config that never went through ``from_pretrained``/``_check_and_adjust_experts_implementation``
    # (a module built directly); transformers' experts forward then takes its eager loop.
    return EAGER if implementation in ("eager", None) else TOP_K_SUM


def unfuse_experts(block: nn.Module, spec: FusedExperts) -> UnfusedExperts | None:
    """Replace ``block``'s fused experts module (``spec.module``) in place by its unfused view, built on
    the fused parameters' device and dtype (``meta`` in a skeleton: nothing allocated); real weights are
    copied. Returns the view; None when the block has no such module. Already unfused: returned as is."""
    try:
        fused = block.get_submodule(spec.module)
    except AttributeError:
        return None
    if isinstance(fused, UnfusedExperts):
        return fused
    gate_up, down = getattr(fused, spec.gate_up, None), getattr(fused, spec.down, None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    experts, rows, hidden = gate_up.shape
    intermediate = rows // 2
    if rows % 2 or tuple(down.shape) != (experts, hidden, intermediate):
        raise ValueError(f"{spec.module}: {spec.gate_up} {list(gate_up.shape)} and {spec.down} {list(down.shape)} "
                         "are not [E, 2I, H] and [E, H, I]")
    view = UnfusedExperts(spec, experts, hidden, intermediate, getattr(fused, spec.activation),
                          accumulate=accumulation_of(fused), device=gate_up.device, dtype=gate_up.dtype)
    if gate_up.device.type != "meta":
        with torch.no_grad():
            for expert, g, u, d in zip(view, *split_fused(gate_up.detach(), down.detach()), strict=True):
                getattr(expert, spec.gate).weight.copy_(g)
                getattr(expert, spec.up).weight.copy_(u)
                getattr(expert, spec.down_linear).weight.copy_(d)
    parent, _, leaf = spec.module.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, view)
    return view


@dataclass(frozen=True)
class ExpertSlice:
    """A virtual 2-D tensor of the unfused view: rows ``rows`` of expert ``expert`` of a stored 3-D tensor."""

    stored: str
    expert: int
    rows: tuple[int, int] | None  # None: the whole expert matrix
    shape: tuple[int, int]

    def take(self, stored: torch.Tensor) -> torch.Tensor:
        matrix = stored[self.expert]
        return matrix if self.rows is None else matrix[self.rows[0]:self.rows[1]]


def expert_slices(adapter: FamilyAdapter, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, ExpertSlice]]:
    """For each stored fused tensor of the blocks (name -> shape: the safetensors headers), the
    virtual per-expert keys it stands for, in order: ``{stored name: {virtual key: slice}}``.
    A fused pair that does not describe [E, 2I, H] and [E, H, I] is refused, naming both tensors."""
    spec = adapter.fused_experts
    if spec is None:
        return {}
    head = adapter.blocks + "."
    tail = f".{spec.module}.{spec.gate_up}"
    views: dict[str, dict[str, ExpertSlice]] = {}
    for name, shape in shapes.items():
        if not (name.startswith(head) and name.endswith(tail) and name[len(head):-len(tail)].isdigit()):
            continue
        base = name[:-len(spec.gate_up)]  # "<block>.<module>."
        down_name = base + spec.down
        down = shapes.get(down_name)
        if len(shape) != 3 or shape[1] % 2 or down is None or len(down) != 3 or \
                tuple(down) != (shape[0], shape[2], shape[1] // 2):
            raise InputDataError(
                f"fused experts tensors {name} {list(shape)} and {down_name} "
                f"{list(down) if down is not None else '(missing)'} are not [experts, 2 * intermediate, hidden] "
                "and [experts, hidden, intermediate]",
                hint="the weights do not match the model family, or a weight file is damaged; re-download the model",
            )
        experts, rows, hidden = shape
        inter = rows // 2
        views[name] = {f"{base}{e}.{part}.weight": ExpertSlice(name, e, span, (inter, hidden))
                       for e in range(experts) for part, span in ((spec.gate, (0, inter)), (spec.up, (inter, rows)))}
        views[down_name] = {f"{base}{e}.{spec.down_linear}.weight": ExpertSlice(down_name, e, None, (hidden, inter))
                            for e in range(experts)}
    return views


def unfuse_model(model: nn.Module, adapter: FamilyAdapter) -> None:
    """The unfused view in every block and in every layer of a shared stack (computing with the blocks'
    weights), in place; nothing to do for families without fused experts."""
    spec = adapter.fused_experts
    if spec is None:
        return
    layers = list(adapter.block_list(model))
    if adapter.shared_stack is not None:
        layers += list(model.get_submodule(adapter.shared_stack.layers))
    for layer in layers:
        unfuse_experts(layer, spec)
