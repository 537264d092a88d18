"""Streams tensors into safetensors shards with a Hugging Face index file, in bounded memory.

Each tensor's bytes are appended to the current shard's data file as soon as it arrives, so the
writer holds no tensors: peak memory stays at one block however large the model. When a shard is
full its safetensors header (which must precede the data) is written and the data copied behind it.
Shards get their final ``model-0000i-of-0000n`` names once ``n`` is known.

:meth:`ShardedWriter.manifest` is the list of every tensor written (name -> safetensors dtype and
shape); ``quantize`` and ``convert`` store it in ``qdlm_report.json`` (``"tensors"``), from which
``inspect``/``push``/``eval`` check that no tensor has gone missing since (docs/FORMAT.md).

The quantize pipeline writes into a :class:`TensorSink`: a ShardedWriter is the native one (each
quantized linear as the format's tensors), ``exports/streaming.py`` has a converting one, and
:class:`TeeSink` feeds several at once.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Protocol

import torch

from ..core.schemes import QuantizedWeight
from .spec import ST_DTYPE_NAMES, linear_tensors

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB" as transformers counts it (the CLI default)



class _Shard:
    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_suffix(".data")
        self.data = open(self.data_path, "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def append(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self.entries[name] = {
            "dtype": ST_DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + len(raw)],
        }
        self.data.write(raw)
        self.size += len(raw)

    def finish(self) -> None:
        """Write ``header length | JSON header (space-padded to 8 bytes) | data`` as safetensors does."""
        self.data.close()
        header = {"__metadata__": {"format": "pt"}, **self.entries}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        self.data_path.unlink()


class TensorSink(Protocol):
    """Where the quantize pipeline puts a checkpoint's tensors, as it produces them."""

    def add_linear(self, name: str, qweight: QuantizedWeight) -> None:
        """One quantized linear ``name``."""

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor of no quantized linear (embeddings, norms, full-precision linears)."""


class TeeSink:
    """Every tensor to each of ``sinks``, in order."""

    def __init__(self, *sinks: TensorSink):
        self.sinks = sinks

    def add_linear(self, name: str, qweight: QuantizedWeight) -> None:
        for sink in self.sinks:
            sink.add_linear(name, qweight)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.add_tensor(name, tensor)


class ShardedWriter:
    """Safetensors shards in ``folder``; as a :class:`TensorSink`, the native checkpoint's tensors."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[_Shard] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in ST_DTYPE_NAMES:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu")
        size = tensor.numel() * tensor.element_size()
        shard = self._shards[-1] if self._shards else None
        if shard is None or (shard.entries and shard.size + size > self.max_shard_bytes):
            if shard is not None:
                shard.finish()
            shard = _Shard(self.folder / f".shard-{len(self._shards):05d}.safetensors.part")
            self._shards.append(shard)
        shard.append(name, tensor)
        self.total_bytes += size

    def manifest(self) -> dict[str, dict]:
        """Every tensor written so far, sorted by name: ``{name: {"dtype": "I32", "shape": [...]}}``
        (safetensors dtype names). Written into ``qdlm_report.json`` as ``"tensors"``."""
        entries = {name: entry for shard in self._shards for name, entry in shard.entries.items()}
        return {name: {"dtype": e["dtype"], "shape": list(e["shape"])} for name, e in sorted(entries.items())}

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.add(name, tensor)

    def add_linear(self, name: str, qweight: QuantizedWeight) -> None:
        """The native format's tensors of one quantized linear (``spec.linear_tensors``)."""
        self.add_all(name, linear_tensors(qweight))

    def add_all(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for suffix, tensor in tensors.items():
            self.add(f"{prefix}.{suffix}" if prefix else suffix, tensor)

    def close(self) -> list[Path]:
        """Finish the last shard, give shards their final names, write the index if sharded."""
        if not self._shards:
            raise ValueError("no tensors were written")
        self._shards[-1].finish()
        n = len(self._shards)
        if n == 1:
            final = self.folder / "model.safetensors"
            self._shards[0].path.rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, shard in enumerate(self._shards, 1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            shard.path.rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name in shard.entries})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return finals
