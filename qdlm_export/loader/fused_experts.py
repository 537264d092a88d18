"""Fused experts of a loaded checkpoint: transformers' 3-D expert parameters (DiffusionGemma's
``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I]) as stacked packed tensors,
computed with the grouped expert GEMM (``kernels/grouped_experts.py``).

Before the weights load, :func:`replace_fused_experts` swaps every module that
``quantization_config.fused_experts`` lists for a :class:`QdlmFusedExperts` whose children
``gate_up_proj`` and ``down_proj`` (:class:`QdlmStackedLinear`) hold buffers with the checkpoint's
tensor names (``...experts.gate_up_proj.weight_packed`` [E, 2I, words] ...), so the stacked tensors load
straight into them. Its ``forward(hidden_states, top_k_index, top_k_weights)`` computes what
transformers' eager ``forward`` computes: each (token, slot) pair goes to its expert (an index equal
to the expert count selects none and is skipped), ``down(act(gate x) * up x)``, times its routing
weight (in the weights' dtype), cast to the hidden dtype and added to a zero output expert by expert.
Here the pairs are sorted by expert and each projection is one grouped GEMM over all experts.

The module names the stacked tensors and the row split itself: nothing is read from the model's code
beyond the activation it keeps. ``dequantized_module`` gives back the original module with the
dequantized weights (``model.dequantize()``).

A fused module stored unstacked (``"stacked": false``: weight-activation experts, each linear with its
own online transforms and activation quantizer) becomes a :class:`QdlmUnstackedExperts` instead
(:func:`replace_unstacked_experts`): children ``"0"`` .. ``"E-1"``, each a :class:`QdlmExpert` holding
``gate_proj``/``up_proj``/``down_proj`` linears that ``replace_quantized_linears`` then swaps for
``QdlmLinear`` s like any listed linear, and the fused module's ``forward(hidden_states, top_k_index,
top_k_weights)``, expert by expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..format.spec import (
    FusedProjection,
    LinearSpec,
    fused_projections,
    module_spec,
    unstacked_projections,
)
from ..kernels.grouped_experts import grouped_expert_gemm
from ..kernels.weight_only import dequantize_packed


class QdlmStackedLinear(nn.Module):
    """One projection of every expert, stacked: ``weight_packed`` [E, out, words], ``weight_scale``
    [E, out, groups] (``weight_zero_point`` when asymmetric), ``weight_shape`` [E, 2]. Called on the
    rows of every expert sorted by expert and the experts' row offsets [E + 1]."""

    def __init__(self, spec: LinearSpec, device: torch.device | str | None = None):
        super().__init__()
        self.spec = spec
        self.num_experts = spec.experts
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        for suffix, (dtype, shape) in spec.tensors().items():
            self.register_buffer(suffix, torch.empty(shape, dtype=dtype, device=device))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return grouped_expert_gemm(x_sorted, offsets, self.weight_packed, self.weight_scale,
                                   getattr(self, "weight_zero_point", None), s.bits, s.group_size, s.in_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """Every expert's weight ``(q - z) * s``, ``[E, out, in]`` in ``dtype``."""
        s, zero = self.spec, getattr(self, "weight_zero_point", None)
        return torch.stack([
            dequantize_packed(self.weight_packed[e], self.weight_scale[e], None if zero is None else zero[e],
                              s.bits, s.group_size, s.in_features, dtype)
            for e in range(self.num_experts)])

    def extra_repr(self) -> str:
        s = self.spec
        return (f"experts={s.experts}, in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, symmetric={s.symmetric}")


class QdlmFusedExperts(nn.Module):
    """A fused experts module over stacked packed weights (see the module docstring)."""

    def __init__(self, gate_up: FusedProjection, down: FusedProjection, specs: dict[str, LinearSpec],
                 act_fn: nn.Module, float_module: nn.Module | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts = gate_up.experts
        self.gate_up_name, self.down_name = gate_up.attribute, down.attribute
        self.gate_up_rows = gate_up.rows
        setattr(self, gate_up.attribute, QdlmStackedLinear(specs[gate_up.name], device))
        setattr(self, down.attribute, QdlmStackedLinear(specs[down.name], device))
        self.act_fn = act_fn
        # the weightless original (kept out of the module tree): what dequantize() fills
        self.__dict__["_float_module"] = float_module
        self.calls = 0  # grouped passes run (tests read it)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        experts, k = self.num_experts, top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = flat.argsort(stable=True)
        offsets = torch.zeros(experts + 1, dtype=torch.int64, device=flat.device)
        # an index equal to the expert count selects no expert (transformers skips it): sorted last, dropped
        offsets[1:] = torch.bincount(flat, minlength=experts + 1)[:experts].cumsum(0)
        kept = order[: int(offsets[-1])]
        token, slot = kept // k, kept % k
        gate_up = getattr(self, self.gate_up_name)(hidden_states[token], offsets)
        gate, up = gate_up.split(self.gate_up_rows, dim=-1)
        out = getattr(self, self.down_name)(self.act_fn(gate) * up, offsets)
        out = out * top_k_weights[token, slot, None]
        self.calls += 1
        # rows are in expert order, so each token sums its experts in the order transformers' loop does
        return torch.zeros_like(hidden_states).index_add_(0, token, out.to(hidden_states.dtype))

    def dequantized_module(self, dtype: torch.dtype) -> nn.Module:
        """The original fused experts module holding the dequantized weights in ``dtype``."""
        module = self.__dict__["_float_module"]
        if module is None:
            raise CheckpointError("this fused experts module keeps no original to dequantize into",
                                  hint="load the original model instead")
        for name in (self.gate_up_name, self.down_name):
            weight = getattr(self, name).dequantized(dtype)
            setattr(module, name, nn.Parameter(weight))
        return module.to(weight.device)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, gate_up_rows={list(self.gate_up_rows)}"


def fused_modules(qconfig: dict[str, Any]) -> dict[str, tuple[FusedProjection, FusedProjection]]:
    """Fused experts module name (the checkpoint's) -> its (gate_up, down) projections."""
    found: dict[str, dict[str, FusedProjection]] = {}
    for fp in fused_projections(qconfig).values():
        found.setdefault(fp.module, {})[fp.role] = fp
    return {module: (roles["gate_up"], roles["down"]) for module, roles in found.items()}


def replace_fused_experts(model: nn.Module, qconfig: dict[str, Any], local: Callable[[str], str]) -> list[str]:
    """Swap each fused experts module of ``quantization_config`` for a :class:`QdlmFusedExperts` (on the
    device of its parameters); ``local`` maps a checkpoint name to the model's. Returns the names swapped."""
    replaced = []
    for name, (gate_up, down) in fused_modules(qconfig).items():
        path = local(name)
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"quantization_config lists fused experts {name!r}, which this model does not have",
                                  hint="the checkpoint's config.json does not match its modeling code") from None
        specs, device = {}, None
        for fp in (gate_up, down):
            weight = getattr(module, fp.attribute, None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or (
                    weight.shape[0], weight.shape[1]) != (fp.experts, fp.out_features):
                got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise CheckpointError(
                    f"{name}.{fp.attribute} is {got} in this model; quantization_config describes "
                    f"[{fp.experts}, {fp.out_features}, in] ({fp.experts} experts, rows {list(fp.rows)})",
                    hint="the checkpoint's config.json does not match its modeling code")
            specs[fp.name] = module_spec(qconfig, fp.name, weight.shape[2], fp.out_features, False, experts=fp.experts)
            device = weight.device
        act_fn = getattr(module, gate_up.activation, None)
        if not callable(act_fn):
            raise CheckpointError(f"{name} has no activation {gate_up.activation!r}",
                                  hint="the checkpoint's config.json does not match its modeling code")
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QdlmFusedExperts(gate_up, down, specs, act_fn, module, device))
        replaced.append(name)
    return replaced


def stacked_names(qconfig: dict[str, Any]) -> set[str]:
    """The stacked projections' names in ``quantized_modules`` (not linears of the model)."""
    return set(fused_projections(qconfig))


# ---- unstacked (weight-activation) experts ------------------------------------------------------


class QdlmExpert(nn.Module):
    """One expert of an unstacked fused module: ``down(act(gate x) * up x)`` with the linears named by
    the checkpoint's ``parts`` (``nn.Linear`` placeholders until ``replace_quantized_linears``)."""

    def __init__(self, gate: str, up: str, down: str, hidden: int, intermediate: int, act_fn: nn.Module,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self._names = (gate, up, down)
        kw = {"bias": False, "device": device, "dtype": dtype}
        setattr(self, gate, nn.Linear(hidden, intermediate, **kw))
        setattr(self, up, nn.Linear(hidden, intermediate, **kw))
        setattr(self, down, nn.Linear(intermediate, hidden, **kw))
        self.act_fn = act_fn  # the fused module's own activation (stateless), shared by the experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self._names)
        return down(self.act_fn(gate(x)) * up(x))


class QdlmUnstackedExperts(nn.Module):
    """A fused experts module whose experts are stored one quantized linear each.

    ``forward`` is the fused module's: each (token, slot) pair goes to its expert (an index equal to
    the expert count selects none), times its routing weight. How the experts' outputs add up follows
    the model config's experts implementation, as transformers' dispatch of the fused module does:
    ``eager`` (or none set) casts each expert's weighted output to the hidden dtype and adds it expert
    by expert; the others (``grouped_mm``, ``batched_mm`` ...) sum a token's ``k`` weighted outputs in
    the routing weights' dtype and cast once."""

    def __init__(self, gate_up: FusedProjection, down: FusedProjection, act_fn: nn.Module, config: Any = None,
                 *, hidden: int, intermediate: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts = gate_up.experts
        gate, up = gate_up.parts
        for index in range(self.num_experts):
            self.add_module(str(index), QdlmExpert(gate, up, down.parts[0], hidden, intermediate, act_fn,
                                                   device=device, dtype=dtype))
        self.__dict__["config"] = config  # read at each call: set_experts_implementation() applies

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> QdlmExpert:
        if not -self.num_experts <= index < self.num_experts:
            raise IndexError(f"expert {index} out of range ({self.num_experts} experts)")
        return self._modules[str(index % self.num_experts)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        eager = getattr(self.__dict__["config"], "_experts_implementation", None) in (None, "eager")
        tokens, top_k = top_k_index.shape
        if eager:
            out = torch.zeros_like(hidden_states)
        else:
            dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
            out = hidden_states.new_zeros((tokens, top_k, hidden_states.shape[-1]), dtype=dtype)
        for expert in torch.unique(top_k_index).tolist():  # ascending: the order the eager loop adds in
            if expert >= self.num_experts:  # the expert-parallel sentinel: no expert here
                continue
            token, slot = torch.where(top_k_index == expert)
            weighted = self[expert](hidden_states[token]) * top_k_weights[token, slot, None]
            if eager:
                out.index_add_(0, token, weighted.to(out.dtype))
            else:
                out[token, slot] = weighted.to(out.dtype)
        return out if eager else out.sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, unstacked"


def unstacked_modules(qconfig: dict[str, Any]) -> dict[str, tuple[FusedProjection, FusedProjection]]:
    """Fused experts module stored unstacked (the checkpoint's name) -> its (gate_up, down) projections."""
    found: dict[str, dict[str, FusedProjection]] = {}
    for fp in unstacked_projections(qconfig).values():
        found.setdefault(fp.module, {})[fp.role] = fp
    return {module: (roles["gate_up"], roles["down"]) for module, roles in found.items()}


def unstacked_linear_names(qconfig: dict[str, Any]) -> set[str]:
    """The per-expert linears of the unstacked modules, as ``quantized_modules`` lists them."""
    return {name for fp in unstacked_projections(qconfig).values() for name in fp.expert_linears()}


def replace_unstacked_experts(model: nn.Module, qconfig: dict[str, Any], local: Callable[[str], str]) -> list[str]:
    """Swap each fused experts module stored unstacked for a :class:`QdlmUnstackedExperts` (its linears
    on the device and in the dtype of the fused parameters: ``meta`` while transformers builds the
    model); ``local`` maps a checkpoint name to the model's. Returns the names swapped."""
    replaced = []
    for name, (gate_up, down) in unstacked_modules(qconfig).items():
        path = local(name)
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"quantization_config lists fused experts {name!r}, which this model does not have",
                                  hint="the checkpoint's config.json does not match its modeling code") from None
        weights = [getattr(module, fp.attribute, None) for fp in (gate_up, down)]
        hidden, inter = down.out_features, gate_up.rows[0]
        # gate_up [E, 2I, H] with gate and up rows I each, down [E, H, I]
        wanted = [(gate_up.experts, 2 * inter, hidden), (down.experts, hidden, inter)]
        if len(set(gate_up.rows)) != 1 or [tuple(w.shape) if isinstance(w, torch.Tensor) else None
                                           for w in weights] != wanted:
            got = [list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__ for w in weights]
            raise CheckpointError(
                f"{name}'s {gate_up.attribute} and {down.attribute} are {got[0]} and {got[1]} in this model; "
                f"quantization_config describes {gate_up.experts} experts of gate/up rows {list(gate_up.rows)} and "
                f"down rows {list(down.rows)}", hint="the checkpoint's config.json does not match its modeling code")
        act_fn = getattr(module, gate_up.activation, None)
        if not callable(act_fn):
            raise CheckpointError(f"{name} has no activation {gate_up.activation!r}",
                                  hint="the checkpoint's config.json does not match its modeling code")
        experts = QdlmUnstackedExperts(gate_up, down, act_fn, getattr(module, "config", None),
                                       hidden=hidden, intermediate=inter,
                                       device=weights[0].device, dtype=weights[0].dtype)
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, experts)
        replaced.append(name)
    return replaced
