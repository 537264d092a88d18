"""A native qdlm checkpoint as the exports read it (``convert DIR``): each quantized linear's resolved
scheme and its codes, scales and zero points, and the tensors that belong to no quantized linear.

Fused experts (``quantization_config.fused_experts``) are stored stacked (``MODULE.gate_up_proj.*``
``[E, 2I, ...]``); the exports write one linear per expert (``MODULE.E.gate_proj``...), the layout of
``quantize --format``, so a stacked projection is read as its per-expert slices."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.packing import unpack_rows
from ..format.reader import CheckpointReader
from ..format.spec import fused_projections
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
        stored = [QuantizedModule.from_spec(name, checked.specs[name]) for name in self.qconfig["quantized_modules"]]
        self._owner = {key: m for m in stored for key in m.keys()}  # noqa: SIM118 - a method
        # stored module name -> the modules the exports write for it (itself, or its per-expert slices)
        self._written: dict[str, list[QuantizedModule]] = {}
        self._slices: dict[str, tuple[str, int, int]] = {}  # per-expert name -> (stacked name, expert, first row)
        stacked = fused_projections(self.qconfig)
        for m in stored:
            fp = stacked.get(m.name)
            if fp is None:
                self._written[m.name] = [m]
                continue
            self._written[m.name] = []
            for e in range(fp.experts):
                first = 0
                for part, rows in zip(fp.parts, fp.rows):
                    spec = dataclasses.replace(m.spec, out_features=rows, experts=0)
                    expert = QuantizedModule.from_spec(f"{fp.module}.{e}.{part}", spec)
                    self._written[m.name].append(expert)
                    self._slices[expert.name] = (m.name, e, first)
                    first += rows
        self.modules = [x for m in stored for x in self._written[m.name]]
        # the stacked tensors of the projection whose experts are being read (one projection at a time)
        self._cached: tuple[str, dict[str, torch.Tensor]] = ("", {})

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

    def modules_at(self, key: str) -> list[QuantizedModule]:
        """The modules the exports write when the conversion reaches tensor ``key``: a stored module's
        ``weight_packed`` gives that module, or a stacked projection's every per-expert slice."""
        if not key.endswith(".weight_packed"):
            return []
        return self._written.get(key.removesuffix(".weight_packed"), [])

    def passthrough_keys(self) -> Iterator[str]:
        """Tensors that belong to no quantized module (embeddings, norms, full-precision linears)."""
        return (k for k in self._order if k not in self._owner)

    def linear(self, m: QuantizedModule) -> StoredLinear:
        """The tensors of module ``m``, read on request."""
        return StoredLinear(self, m)

    def close(self) -> None:
        self._reader.close()

    def tensor_of(self, module: QuantizedModule, suffix: str) -> torch.Tensor:
        """``module``'s tensor ``suffix``: stored under its name, or its expert's rows of the stacked tensor
        (the stacked tensor is kept while its experts are read one after the other)."""
        if module.name not in self._slices:
            return self.get(f"{module.name}.{suffix}")
        stacked, expert, first = self._slices[module.name]
        if self._cached[0] != stacked:
            self._cached = (stacked, {})
        tensors = self._cached[1]
        if suffix not in tensors:
            tensors[suffix] = self.get(f"{stacked}.{suffix}")
        return tensors[suffix][expert, first:first + module.out_features].contiguous()


class StoredLinear:
    """:class:`~.quantized_module.LinearTensors` of one module of a native folder."""

    def __init__(self, ckpt: NativeCheckpoint, module: QuantizedModule):
        self.ckpt, self.module = ckpt, module

    def packed(self) -> torch.Tensor:
        return self.ckpt.tensor_of(self.module, "weight_packed")

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.packed(), self.module.bits, self.module.in_features)

    def scale(self) -> torch.Tensor:
        return self.ckpt.tensor_of(self.module, "weight_scale")

    def zero_points(self) -> torch.Tensor:
        if self.module.symmetric:
            return self.module.symmetric_zero_points()
        return self.ckpt.tensor_of(self.module, "weight_zero_point")

    def bias(self) -> torch.Tensor | None:
        return self.ckpt.get(f"{self.module.name}.bias") if self.module.spec.has_bias else None
