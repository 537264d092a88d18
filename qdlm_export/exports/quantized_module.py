"""One quantized linear as every export encodes it: its resolved scheme (:class:`QuantizedModule`) and
its codes, scales and zero points (:class:`LinearTensors`), read from a native folder
(``native_source.StoredLinear``) or taken from the quantizer's in-memory result (:class:`InMemoryLinear`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.packing import pack_rows
from ..core.schemes import QuantizedWeight, WeightScheme
from ..format.spec import LinearSpec, quantized_linear_spec

_MARKERS = ("quantize_input", "quantize_output")  # activation quantization, not transforms


@dataclass(frozen=True)
class QuantizedModule:
    """One quantized linear: its name, resolved scheme and online ops (no tensor values)."""

    name: str
    spec: LinearSpec
    online_ops: tuple[dict, ...]  # transforms.modules[name] without the quantize markers
    quantizes_input: bool
    quantizes_output: bool

    @classmethod
    def from_spec(cls, name: str, spec: LinearSpec) -> QuantizedModule:
        online = tuple(op for op in spec.input_transforms if op.get("op") not in _MARKERS)
        return cls(name=name, spec=spec, online_ops=online,
                   quantizes_input=spec.quantizes_input, quantizes_output=spec.quantizes_output)

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    @property
    def groups(self) -> int:
        return self.spec.groups

    @property
    def group(self) -> int:
        """Columns per group (``in_features`` when per channel)."""
        return self.in_features if self.group_size == -1 else self.group_size

    def keys(self) -> list[str]:
        """Every native tensor of this module (weight, scale, zero, shape, bias, transform tensors)."""
        return [f"{self.name}.{suffix}" for suffix in self.spec.tensors()]

    def symmetric_zero_points(self) -> torch.Tensor:
        """uint8 ``[out, groups]`` filled with the fixed symmetric zero ``2^(bits-1)``."""
        return torch.full((self.out_features, self.groups), 1 << (self.bits - 1), dtype=torch.uint8)

    def weight_shape(self) -> torch.Tensor:
        """The native ``weight_shape`` tensor: int64 ``[out, in]``."""
        return torch.tensor([self.out_features, self.in_features], dtype=torch.int64)


def planned_module(name: str, out_features: int, in_features: int, scheme: WeightScheme,
                   scale_dtype: torch.dtype) -> QuantizedModule:
    """A module as it will be quantized, from its weight's shape: enough for the shape refusals
    (``ExportFormat.module_problems``) before any work."""
    spec = LinearSpec(in_features=in_features, out_features=out_features, bits=scheme.bits,
                      group_size=scheme.group_size, symmetric=scheme.symmetric, scale_dtype=scale_dtype)
    return QuantizedModule.from_spec(name, spec)


class LinearTensors(Protocol):
    """The tensors of one quantized linear that the exports re-encode (all on the CPU)."""

    def codes(self) -> torch.Tensor:
        """uint8 ``[out, in]`` codes in ``[0, 2^bits)``."""

    def packed(self) -> torch.Tensor:
        """The native ``weight_packed`` (the codes as one little-endian bit stream per row)."""

    def scale(self) -> torch.Tensor:
        """``[out, groups]`` scales in their stored dtype."""

    def zero_points(self) -> torch.Tensor:
        """uint8 ``[out, groups]`` zero codes (symmetric: the fixed ``2^(bits-1)``)."""

    def bias(self) -> torch.Tensor | None:
        ...


class InMemoryLinear:
    """:class:`LinearTensors` of a quantizer's result, exactly what the native writer would store."""

    def __init__(self, module: QuantizedModule, qweight: QuantizedWeight):
        self.module, self.qweight = module, qweight

    @classmethod
    def build(cls, name: str, qweight: QuantizedWeight, activations: dict | None) -> InMemoryLinear:
        return cls(QuantizedModule.from_spec(name, quantized_linear_spec(name, qweight, activations=activations)),
                   qweight)

    def codes(self) -> torch.Tensor:
        return self.qweight.codes.detach().to("cpu", torch.uint8)

    def packed(self) -> torch.Tensor:
        return pack_rows(self.codes(), self.module.bits)

    def scale(self) -> torch.Tensor:
        return self.qweight.scale.detach().cpu().contiguous()

    def zero_points(self) -> torch.Tensor:
        if self.qweight.zero_point is None:
            return self.module.symmetric_zero_points()
        return self.qweight.zero_point.detach().to("cpu", torch.uint8).contiguous()

    def bias(self) -> torch.Tensor | None:
        bias = self.qweight.bias
        return None if bias is None else bias.detach().cpu().contiguous()
