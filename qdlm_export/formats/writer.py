"""Streams tensors into safetensors shards with a Hugging Face index file.

Tensors are buffered until a shard is full, then written, so memory holds at most one shard beyond
what the caller keeps. Shards get their final ``model-0000i-of-0000n`` names once ``n`` is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class ShardedWriter:
    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def add_all(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for suffix, tensor in tensors.items():
            self.add(f"{prefix}.{suffix}" if prefix else suffix, tensor)

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors.part"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index if sharded."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.folder / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._shards, 1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return finals
