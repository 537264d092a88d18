"""The one reader of checkpoint folders (native checkpoints, their exports, and source models): a folder
opened safely (no symbolic link followed out of it, no index entry naming a file outside it), its
config.json, its weight files, every tensor's dtype and shape from the safetensors headers without
loading anything, and tensors loaded on demand."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .output import INCOMPLETE_MARKER, is_staging_folder
from .tensor_headers import (
    DAMAGED_HINT,
    MAKE_HINT,
    TensorEntry,
    read_safetensors_headers,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def link_roots(folder: Path) -> tuple[Path, ...]:
    """Where symlinks in ``folder`` may lead: the folder itself and, for a snapshot of the Hugging
    Face cache (``models--X/snapshots/REV``, whose files are links into ``models--X/blobs``), that
    repository's blobs."""
    root = folder.resolve()
    roots = [root]
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--") and blobs.is_dir():
        roots.append(blobs)
    return tuple(roots)


def stays_inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether ``path``, links resolved, lies in one of ``roots`` (:func:`link_roots`)."""
    target = path.resolve()
    return any(_inside(target, root) for root in roots)


def check_symlinks(folder: Path) -> None:
    """Refuse a symlink anywhere in ``folder`` whose target lies outside it (it would be read,
    loaded or uploaded as if it were part of the checkpoint)."""
    roots = link_roots(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for entry in (*dirnames, *filenames):
            path = Path(dirpath) / entry
            if not path.is_symlink():
                continue
            target = path.resolve()
            if not stays_inside(path, roots):
                raise CheckpointError(
                    f"{path.relative_to(folder).as_posix()} in {folder} is a symbolic link to {target}, outside the "
                    "checkpoint folder; it is refused so that nothing outside the folder is read or uploaded",
                    hint="replace the link by a copy of the file, or remove it",
                )


def _shard_path(folder: Path, shard: Any) -> Path:
    """The path of one index entry's shard; refuses entries that leave the folder."""
    where = f"{INDEX_FILE} in {folder}"
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{where} maps a tensor to {shard!r}, which is not a file name", hint=DAMAGED_HINT)
    pure = PurePosixPath(shard.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(shard) or ".." in pure.parts:
        raise CheckpointError(
            f"{where} lists the shard {shard!r}, a path outside the checkpoint folder; shards must be files inside it",
            hint="the index was edited or is hostile: re-create the checkpoint with `qdlm-export quantize`",
        )
    path = folder / pure
    if not stays_inside(path, link_roots(folder)):
        raise CheckpointError(
            f"{where} lists the shard {shard!r}, which resolves outside the checkpoint folder",
            hint="the index was edited or is hostile: re-create the checkpoint with `qdlm-export quantize`",
        )
    if not shard.endswith(".safetensors"):
        raise CheckpointError(f"{where} lists the shard {shard!r}, which is not a .safetensors file", hint=DAMAGED_HINT)
    return path


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a checkpoint loads: the shards of its index (each checked to stay inside
    the folder and to exist), or else ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map object)",
                                  hint=DAMAGED_HINT) from None
        shards = {value: _shard_path(folder, value) for value in dict.fromkeys(weight_map.values())}  # once per shard
        absent = sorted(name for name, path in shards.items() if not path.is_file())
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise CheckpointError(
                f"{folder} is missing {len(absent)} weight shard(s) listed in {INDEX_FILE}: {shown}",
                hint="the export was interrupted or files were moved. " + DAMAGED_HINT,
            )
        files = sorted(set(shards.values()))
    else:  # what from_pretrained loads without an index: model.safetensors, nothing else
        files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else []
    if not files:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        found = f" ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not loaded without an index)" if others else ""
        raise CheckpointError(
            f"{folder} has config.json but no weights ({SINGLE_FILE}, or shards with {INDEX_FILE}){found}",
            hint=MAKE_HINT,
        )
    return files


def read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder} has no config.json, so it is not a complete checkpoint",
            hint="it may be an interrupted run; " + MAKE_HINT,
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not readable JSON ({exc})", hint=DAMAGED_HINT) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} should hold a JSON object, not a {type(config).__name__}",
                              hint=DAMAGED_HINT)
    return config


def check_folder(folder: Path) -> None:
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist", hint=MAKE_HINT)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder", hint=MAKE_HINT)
    if is_staging_folder(folder):
        raise CheckpointError(
            f"{folder} is the staging folder of a qdlm-export run that is still running or was interrupted "
            f"(it holds {INCOMPLETE_MARKER} or is named like .NAME.partial-*): it is not a finished checkpoint",
            hint="use the --out folder once quantize has finished; a leftover of a killed run can be deleted "
            "(the next run into the same parent folder removes it)",
        )


class CheckpointReader:
    """The tensors of a folder's weight files, by name: dtype and shape from the headers (nothing
    loaded), a tensor loaded when asked for. Files stay open until :meth:`close`."""

    def __init__(self, folder: Path, entries: dict[str, TensorEntry], files: list[Path] | None = None):
        self.folder = Path(folder)
        self.entries = entries  # in file order, then header order
        self.files = files if files is not None else sorted({Path(e.path) for e in entries.values()})
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(cls, folder: str | Path) -> CheckpointReader:
        """A checkpoint folder as ``from_pretrained`` loads it: the shards of its index, or
        ``model.safetensors`` (:func:`weight_files`), headers checked for truncation."""
        folder = Path(folder)
        files = weight_files(folder)
        return cls(folder, read_safetensors_headers(files), files)

    def keys(self) -> list[str]:
        return list(self.entries)

    def has(self, key: str) -> bool:
        return key in self.entries

    def entry(self, key: str) -> TensorEntry:
        return self.entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key].shape)

    def get(self, key: str) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None:
            raise CheckpointError(
                f"tensor {key} is missing from {self.folder}",
                hint=f"run `qdlm-export inspect {self.folder}` to see what is damaged, or re-create the checkpoint",
            )
        handle = self._handles.get(entry.path)
        if handle is None:
            handle = self._handles[entry.path] = safe_open(entry.path, "pt")
        return handle.get_tensor(key)

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        self._handles.clear()  # safe_open handles close when dropped
