"""A native qdlm checkpoint as the exports read it (``convert DIR``): each quantized linear's resolved
scheme and its codes, scales and zero points, and the tensors that belong to no quantized linear."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.packing import unpack_rows
from ..format.reader import CheckpointReader
from ..format.validation import validate_checkpoint
from .quantized_module import QuantizedModule


class NativeCheckpoint:
    """A validated native qdlm folder, read lazily through the one reader: headers at open, tensors on
    request. What ``convert`` encodes from (:class:`~.convert.ExportFormat`)."""

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
        self.modules = [QuantizedModule.from_spec(name, checked.specs[name]) for name in self.qconfig["quantized_modules"]]
        self._owner = {key: m for m in self.modules for key in m.keys()}  # noqa: SIM118 - a method

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

    def linear(self, m: QuantizedModule) -> StoredLinear:
        """The tensors of module ``m``, read on request."""
        return StoredLinear(self, m)

    def close(self) -> None:
        self._reader.close()


class StoredLinear:
    """:class:`~.quantized_module.LinearTensors` of one module of a native folder."""

    def __init__(self, ckpt: NativeCheckpoint, module: QuantizedModule):
        self.ckpt, self.module = ckpt, module

    def packed(self) -> torch.Tensor:
        return self.ckpt.get(f"{self.module.name}.weight_packed")

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.packed(), self.module.bits, self.module.in_features)

    def scale(self) -> torch.Tensor:
        return self.ckpt.get(f"{self.module.name}.weight_scale")

    def zero_points(self) -> torch.Tensor:
        if self.module.symmetric:
            return self.module.symmetric_zero_points()
        return self.ckpt.get(f"{self.module.name}.weight_zero_point")

    def bias(self) -> torch.Tensor | None:
        return self.ckpt.get(f"{self.module.name}.bias") if self.module.spec.has_bias else None
