"""A native qdlm checkpoint as the exports read it: each quantized linear's resolved scheme and its
codes, scales and zero points, and the tensors that belong to no quantized linear."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.packing import unpack_rows
from ..format.reader import CheckpointReader
from ..format.spec import LinearSpec
from ..format.validation import validate_checkpoint


@dataclass(frozen=True)
class QuantizedModule:
    """One quantized linear of a native checkpoint: its resolved scheme and its tensors' keys."""

    name: str
    spec: LinearSpec
    online_ops: tuple[dict, ...]  # transforms.modules[name] without the quantize markers
    quantizes_input: bool
    quantizes_output: bool

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
        """Every stored tensor of this module (weight, scale, zero, shape, bias, transform tensors)."""
        return [f"{self.name}.{suffix}" for suffix in self.spec.tensors()]


class NativeCheckpoint:
    """A validated native qdlm folder, read lazily through the one reader: headers at open, tensors on
    request. What every target encodes from (:class:`~.convert.ExportFormat`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        checked = validate_checkpoint(self.folder)  # every promised tensor present with the right dtype/shape
        self.config: dict[str, Any] = checked.config
        self.qconfig: dict[str, Any] = checked.qconfig
        self._reader = CheckpointReader.open(self.folder)
        by_file: dict[str, list[str]] = {}
        for key, entry in self._reader.entries.items():
            by_file.setdefault(entry.path, []).append(key)
        self._order = [key for path in sorted(by_file) for key in sorted(by_file[path])]
        self.modules = [_module(name, checked.specs[name]) for name in self.qconfig["quantized_modules"]]
        self._owner = {key: m for m in self.modules for key in m.keys()}

    # -- tensors --------------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        return self._reader.get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(key)

    def has(self, key: str) -> bool:
        return self._reader.has(key)

    def keys(self) -> list[str]:
        """Every tensor, file by file, sorted by name in each (the order conversions write them in)."""
        return list(self._order)

    def passthrough_keys(self) -> Iterator[str]:
        """Tensors that belong to no quantized module (embeddings, norms, full-precision linears)."""
        return (k for k in self._order if k not in self._owner)

    def codes(self, m: QuantizedModule) -> torch.Tensor:
        """uint8 ``[out, in]`` codes in ``[0, 2^bits)``."""
        return unpack_rows(self.get(f"{m.name}.weight_packed"), m.bits, m.in_features)

    def scale(self, m: QuantizedModule) -> torch.Tensor:
        return self.get(f"{m.name}.weight_scale")

    def zero_points(self, m: QuantizedModule) -> torch.Tensor:
        """uint8 ``[out, groups]`` zero codes; symmetric modules get their fixed ``2^(bits-1)``."""
        if m.symmetric:
            return torch.full((m.out_features, m.groups), 1 << (m.bits - 1), dtype=torch.uint8)
        return self.get(f"{m.name}.weight_zero_point")

    def bias(self, m: QuantizedModule) -> torch.Tensor | None:
        return self.get(f"{m.name}.bias") if m.spec.has_bias else None

    def close(self) -> None:
        self._reader.close()


def _module(name: str, spec: LinearSpec) -> QuantizedModule:
    online = tuple(op for op in spec.input_transforms if op.get("op") not in ("quantize_input", "quantize_output"))
    return QuantizedModule(name=name, spec=spec, online_ops=online,
                           quantizes_input=spec.quantizes_input, quantizes_output=spec.quantizes_output)
