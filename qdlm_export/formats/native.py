"""The native ``qdlm`` format: tensor names, dtypes and shapes of one quantized linear, and the
``quantization_config`` schema. The written spec is docs/FORMAT.md; this module is its code.

Per quantized linear ``NAME`` (tensor names follow compressed-tensors where they fit):

    NAME.weight_packed      int32   [out, ceil(in*bits/32)]   codes, packed by formats/packing.py
    NAME.weight_scale       float*  [out, groups]             groups = in/group_size (1 per channel)
    NAME.weight_zero_point  uint8   [out, groups]             asymmetric only; unsigned zero codes
    NAME.weight_shape       int64   [2]                       (out, in)
    NAME.bias               float*  [out]                     only if the source linear has a bias
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..quantization import QuantizedWeight, WeightScheme
from .packing import pack_rows, packed_words

FORMAT_NAME = "qdlm"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LinearSpec:
    """Everything needed to allocate (and validate) one quantized linear's tensors."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype
    has_bias: bool = False
    bias_dtype: torch.dtype = torch.float32

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.symmetric)

    @property
    def groups(self) -> int:
        return self.scheme.groups(self.in_features)

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Suffix -> (dtype, shape) of every tensor this linear stores."""
        spec = {
            "weight_packed": (torch.int32, (self.out_features, packed_words(self.in_features, self.bits))),
            "weight_scale": (self.scale_dtype, (self.out_features, self.groups)),
            "weight_shape": (torch.int64, (2,)),
        }
        if not self.symmetric:
            spec["weight_zero_point"] = (torch.uint8, (self.out_features, self.groups))
        if self.has_bias:
            spec["bias"] = (self.bias_dtype, (self.out_features,))
        return spec

    def stored_bytes(self) -> int:
        total = 0
        for dtype, shape in self.tensors().values():
            n = 1
            for s in shape:
                n *= s
            total += n * torch.empty((), dtype=dtype).element_size()
        return total


def linear_tensors(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one quantized linear (suffixes, without the module name)."""
    out, inp = qweight.shape
    tensors = {
        "weight_packed": pack_rows(qweight.codes, qweight.scheme.bits),
        "weight_scale": qweight.scale.contiguous(),
        "weight_shape": torch.tensor([out, inp], dtype=torch.int64),
    }
    if qweight.zero_point is not None:
        tensors["weight_zero_point"] = qweight.zero_point.to(torch.uint8).contiguous()
    if qweight.bias is not None:
        tensors["bias"] = qweight.bias.detach().contiguous()
    for suffix, tensor in qweight.extra_tensors.items():  # transform tensors (rotations, smoothing)
        if suffix in tensors:
            raise ValueError(f"transform tensor name {suffix!r} collides with a weight tensor")
        tensors[suffix] = tensor.detach().contiguous()
    return tensors


def module_spec(qconfig: dict[str, Any], name: str, in_features: int, out_features: int, has_bias: bool,
                bias_dtype: torch.dtype = torch.float32) -> LinearSpec:
    """The spec of module ``name`` under a checkpoint's ``quantization_config`` (overrides applied)."""
    weights = dict(qconfig["weights"])
    weights.update(qconfig.get("module_overrides", {}).get(name, {}))
    return LinearSpec(
        in_features=in_features,
        out_features=out_features,
        bits=int(weights["bits"]),
        group_size=int(weights["group_size"]),
        symmetric=bool(weights["symmetric"]),
        scale_dtype=DTYPES[weights["scale_dtype"]],
        has_bias=has_bias,
        bias_dtype=bias_dtype,
    )
