"""Fused experts in the native format: the pipeline quantizes the unfused view (one linear per expert
and projection, ``BLOCK.experts.E.gate_proj`` ...); :class:`StackingSink` stacks each block's experts
back into the fused module's 3-D layout before they reach the native writer:

    BLOCK.experts.gate_up_proj.<tensor>   [E, 2 * I, ...]   expert e: its gate rows, then its up rows
    BLOCK.experts.down_proj.<tensor>      [E, H, ...]

for every per-linear tensor of ``spec.linear_tensors`` (``weight_packed``, ``weight_scale``,
``weight_zero_point``, ``weight_shape`` ``[E, 2]``). The sink also records the
``quantization_config.fused_experts`` section (:meth:`StackingSink.fused_section`), from which the
loader and ``inspect`` know the layout without the model's code (docs/FORMAT.md "Fused experts").

One stacked tensor holds one scheme: every expert of a block (and gate with up) must share bits,
group size, symmetry, scale dtype and shape, and be weight-only without a bias. A group-size fallback
on one expert is refused with a :class:`ConfigError` naming the expert.

**Weight-activation experts are stored unstacked.** Each expert linear of a weight-activation method
carries its own online input transforms and activation quantizer (per-linear smoothing vectors,
rotations, static scales), which a grouped weight-only GEMM over one stack cannot apply. The block's
first expert linear to arrive decides for the whole block: weight-only, the block is stacked;
weight-activation (online ops or transform tensors), every expert linear of the block passes through
to the native writer under its own name (``BLOCK.experts.E.gate_proj`` ...), an ordinary quantized
linear, and the block's ``fused_experts`` entry says ``"stacked": false``. A weight-activation expert
arriving in a block already stacking is refused, naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..core.schemes import QuantizedWeight
from ..errors import ConfigError
from ..families.base import FamilyAdapter
from .spec import FUSED_ROLES, STACKED_KEY, linear_tensors, quantized_linear_spec
from .writer import TensorSink

_MIXED_HINT = ("the native format stores a block's experts stacked, one scheme per projection: pick a group size "
               "that divides every expert's input size (or --group-size -1), so no expert falls back to another")
_WA_HINT = ("a block's experts are all stacked (weight-only) or all stored one linear each (weight-activation), "
            "decided by its first expert: quantize every expert of the block with the same kind of method")


@dataclass
class _Expert:
    """One expert linear, packed as it arrived (the unpacked codes are not kept)."""

    tensors: dict[str, torch.Tensor]
    key: tuple  # what every stacked expert must share
    shape: tuple[int, int]
    scheme: str


def weight_activation(qweight: QuantizedWeight) -> bool:
    """Whether a quantized linear computes more than its weight: online input ops (activation
    quantization included) or the tensors they read."""
    return bool(qweight.input_transforms or qweight.extra_tensors)


def _refuse_bias(name: str, qweight: QuantizedWeight) -> None:
    if qweight.bias is not None:  # the fused module has no expert bias, so the loader builds none
        raise ConfigError(f"{name}: a fused expert has a bias, which the fused experts module cannot hold",
                          hint="the model's experts have no bias: this is a method bug, please report it")


def _scheme_key(name: str, qweight: QuantizedWeight) -> tuple:
    _refuse_bias(name, qweight)
    if weight_activation(qweight):
        raise ConfigError(
            f"{name}: its block's experts are being stored stacked (weight-only), but it has online input "
            "transforms or activation quantization", hint=_WA_HINT)
    s = qweight.scheme
    return s.bits, s.group_size, s.symmetric, qweight.scale.dtype, qweight.shape[1]


def _describe(key: tuple, shape: tuple[int, int]) -> str:
    bits, group, symmetric, scale_dtype, _ = key
    return (f"{bits}-bit, group {group}, {'symmetric' if symmetric else 'asymmetric'}, "
            f"scales {str(scale_dtype).removeprefix('torch.')}, [{shape[0]}, {shape[1]}]")


def _check_same(module: str, parts: tuple[str, ...], key: tuple[str, int], got: _Expert,
                other_key: tuple[str, int], other: _Expert) -> None:
    if (got.key, got.shape) != (other.key, other.shape):
        raise ConfigError(
            f"{module}.{key[1]}.{key[0]} is quantized as {got.scheme} but {module}.{other_key[1]}.{other_key[0]} as "
            f"{other.scheme}: the experts' {'/'.join(parts)} of one block are stored as one stacked tensor and must "
            "share one scheme", hint=_MIXED_HINT)


class StackingSink:
    """A :class:`~.writer.TensorSink` in front of the native writer: the unfused view's expert linears
    of ``adapter.fused_experts`` are held (packed) until a block's projection is complete, then written
    stacked with :meth:`~.writer.ShardedWriter.add_tensor`; everything else passes through.

    ``num_experts``: the experts of every fused module. :meth:`fused_section` is the
    ``quantization_config.fused_experts`` of what was written; :meth:`finish` refuses a block whose
    experts did not all arrive. A block whose first expert linear is weight-activation passes its
    experts through unstacked (module docstring)."""

    def __init__(self, inner: TensorSink, adapter: FamilyAdapter, num_experts: int):
        fused = adapter.fused_experts
        if fused is None:
            raise ValueError(f"family {adapter.name} has no fused experts")
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        self.inner = inner
        self.fused = fused
        self.num_experts = num_experts
        linears = "|".join(re.escape(n) for n in (fused.gate, fused.up, fused.down_linear))
        self._pattern = re.compile(
            rf"({re.escape(adapter.blocks)}\.\d+\.{re.escape(fused.module)})\.(\d+)\.({linears})")
        # the projections: role -> (stacked attribute, the unfused linears in row order)
        self._roles = {"gate_up": (fused.gate_up, (fused.gate, fused.up)), "down": (fused.down, (fused.down_linear,))}
        self._pending: dict[str, dict[tuple[str, int], _Expert]] = {}
        self._section: dict[str, dict[str, Any]] = {}
        # fused module -> stacked (True) or unstacked (False), decided by its first expert linear
        self._stacked: dict[str, bool] = {}
        # unstacked modules: (linear, expert) -> rows, of what was passed through
        self._passed: dict[str, dict[tuple[str, int], int]] = {}

    @classmethod
    def for_model(cls, inner: TensorSink, adapter: FamilyAdapter, config: Any) -> StackingSink:
        """The sink for a model whose (text) config gives ``num_experts``."""
        text = adapter.text_config(config)
        experts = text.get("num_experts") if isinstance(text, dict) else getattr(text, "num_experts", None)
        if not isinstance(experts, int):
            raise ConfigError(f"the {adapter.name} config has no num_experts: cannot stack its fused experts")
        return cls(inner, adapter, experts)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.inner.add_tensor(name, tensor)

    def add_linear(self, name: str, qweight: QuantizedWeight) -> None:
        match = self._pattern.fullmatch(name)
        if match is None:
            self.inner.add_linear(name, qweight)
            return
        module, expert, linear = match[1], int(match[2]), match[3]
        if expert >= self.num_experts:
            raise ConfigError(f"{name}: expert {expert} of a module with {self.num_experts} experts")
        if not self._stacked.setdefault(module, not weight_activation(qweight)):
            self._pass_through(name, module, linear, expert, qweight)
            return
        key = _scheme_key(name, qweight)
        held = self._pending.setdefault(module, {})
        if (linear, expert) in held:
            raise ValueError(f"{name} quantized twice")
        # ``spec`` validates the scheme against the shape as the format would
        quantized_linear_spec(name, qweight)
        got = _Expert(linear_tensors(qweight), key, qweight.shape, _describe(key, qweight.shape))
        parts = next(parts for _, parts in self._roles.values() if linear in parts)
        other = next(((k, x) for k, x in held.items() if k[0] in parts), None)
        if other is not None:  # refused as soon as it arrives, not when the block's last expert does
            _check_same(module, parts, (linear, expert), got, *other)
        held[(linear, expert)] = got
        for role, (attribute, parts) in self._roles.items():
            if all((part, e) in held for part in parts for e in range(self.num_experts)):
                self._write(module, role, attribute, parts, held)
        if not held:
            del self._pending[module]

    def _pass_through(self, name: str, module: str, linear: str, expert: int, qweight: QuantizedWeight) -> None:
        """One expert linear of an unstacked block: written as an ordinary quantized linear."""
        _refuse_bias(name, qweight)
        passed = self._passed.setdefault(module, {})
        if (linear, expert) in passed:
            raise ValueError(f"{name} quantized twice")
        self.inner.add_linear(name, qweight)
        passed[(linear, expert)] = qweight.shape[0]
        for role, (attribute, parts) in self._roles.items():
            if linear in parts and all((part, e) in passed for part in parts for e in range(self.num_experts)):
                rows = [passed[(part, 0)] for part in parts]
                entry = self._section.setdefault(module, {"num_experts": self.num_experts, "stacked": False,
                                                          "activation": self.fused.activation})
                entry[role] = {"module": attribute, "parts": list(parts), "rows": rows}

    def _write(self, module: str, role: str, attribute: str, parts: tuple[str, ...],
               held: dict[tuple[str, int], _Expert]) -> None:
        experts = [[held.pop((part, e)) for part in parts] for e in range(self.num_experts)]
        first = experts[0][0]
        for suffix in first.tensors:
            if suffix == "weight_shape":  # each expert's (rows of every part, in)
                rows = sum(int(x.tensors[suffix][0]) for x in experts[0])
                per_expert = torch.tensor([rows, first.shape[1]], dtype=torch.int64)
                stacked = per_expert.repeat(self.num_experts, 1)
            else:
                stacked = torch.stack([torch.cat([x.tensors[suffix] for x in row]) for row in experts])
            self.inner.add_tensor(f"{module}.{attribute}.{suffix}", stacked)
        entry = self._section.setdefault(module, {"num_experts": self.num_experts, "activation": self.fused.activation})
        entry[role] = {"module": attribute, "parts": list(parts), "rows": [x.shape[0] for x in experts[0]]}

    def fused_section(self) -> dict[str, dict[str, Any]]:
        """``quantization_config.fused_experts`` of the modules written so far, in the documented field
        order (docs/FORMAT.md); ``"stacked": false`` only on the unstacked ones (absent: stacked)."""
        return {module: {"num_experts": entry["num_experts"],
                         **({STACKED_KEY: False} if entry.get("stacked") is False else {}),
                         **{r: entry[r] for r in FUSED_ROLES if r in entry},
                         "activation": entry["activation"]}
                for module, entry in self._section.items()}

    def finish(self) -> dict[str, dict[str, Any]]:
        """Refuse experts still waiting for the rest of their block (stacked or not); returns
        :meth:`fused_section`."""
        for module, passed in self._passed.items():
            for part in (p for _, parts in self._roles.values() for p in parts):
                missing = [e for e in range(self.num_experts) if (part, e) not in passed]
                if missing:
                    raise ConfigError(f"{module}: {part} of the experts {missing[:8]} was never quantized, so "
                                      "the block's experts are incomplete")
        for module, held in self._pending.items():
            for _, parts in self._roles.values():
                if not any(linear in parts for linear, _ in held):
                    continue
                for part in parts:
                    missing = [e for e in range(self.num_experts) if (part, e) not in held]
                    if missing:
                        raise ConfigError(f"{module}: {part} of the experts {missing[:8]} was never quantized, so "
                                          "the block's stacked tensors cannot be written")
        incomplete = [m for m, entry in self._section.items() if not all(r in entry for r in FUSED_ROLES)]
        if incomplete:
            raise ConfigError(f"{incomplete[0]}: only some of its projections were quantized")
        return self.fused_section()


def shared_stack_section(adapter: FamilyAdapter) -> dict[str, str] | None:
    """``quantization_config.shared_stack`` of a family whose second layer stack computes with the stored
    weights (DiffusionGemma's causal encoder), else None."""
    if adapter.shared_stack is None:
        return None
    alias, stored = adapter.shared_stack.alias
    return {"alias": alias, "stored": stored}
