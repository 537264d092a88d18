"""safetensors headers read with the standard library: one tensor's dtype and shape without loading it,
truncation and corruption named by file, and the check of one quantized linear's tensors against its
:class:`~.spec.LinearSpec`. Shared by the loader (``from_pretrained``'s strict check, also in the
self-contained copy, hence standard library + torch only) and :mod:`.reader` (inspect, convert, push, source)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .spec import ST_DTYPE_NAMES, LinearSpec

# safetensors dtype sizes in bytes (names: spec.ST_DTYPE_NAMES).
ST_ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
}
ST_FLOAT_NAMES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAKE_HINT = "pass the folder written by `qdlm-export quantize` (make one with `qdlm-export quantize MODEL --out DIR`)"
DAMAGED_HINT = (
    "The checkpoint is incomplete or corrupted: create it again with `qdlm-export quantize`, or download it "
    "again (for a Hub model: from_pretrained(..., force_download=True))."
)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    dtype: str  # safetensors name: "F32", "I32", ...
    shape: tuple[int, ...]
    file: str  # the file's name, for messages
    path: str = ""  # where it was read from


def damaged(message: str) -> CheckpointError:
    return CheckpointError(message, hint=DAMAGED_HINT)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Tensor name -> :class:`TensorEntry` of one safetensors file, read from its header only.

    Raises :class:`CheckpointError` naming the file when it is truncated or its header is corrupt
    (the tensors' byte ranges must exactly cover the data that follows the header)."""
    name = os.path.basename(os.fspath(path))
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise damaged(f"weight file {name} is truncated ({size} bytes, not even a safetensors header)")
            length = struct.unpack("<Q", head)[0]
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise damaged(
                    f"weight file {name} is truncated or is not a safetensors file (its header claims {length} "
                    f"bytes, the file has {size})"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"weight file {name} cannot be read ({exc.strerror or exc})",
                              hint="check that the file exists and is readable") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise damaged(f"weight file {name} has a corrupted header (not JSON)") from None
    if not isinstance(header, dict):
        raise damaged(f"weight file {name} has a corrupted header (not a JSON object)")
    data_bytes = size - 8 - length
    entries: dict[str, TensorEntry] = {}
    end_of_data = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(meta["shape"])
            start, end = meta["data_offsets"]
            ok = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise damaged(f"weight file {name} has a corrupted header entry for tensor {key}")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in ST_ITEM_BYTES and numel * ST_ITEM_BYTES[dtype] != end - start:
            raise damaged(
                f"weight file {name} is corrupted: tensor {key} ({dtype} {list(shape)}) should take "
                f"{numel * ST_ITEM_BYTES[dtype]} bytes, its header gives {end - start}"
            )
        end_of_data = max(end_of_data, end)
        entries[key] = TensorEntry(dtype, shape, name, os.fspath(path))
    if end_of_data > data_bytes:
        raise damaged(
            f"weight file {name} is truncated: its tensors need {end_of_data} bytes of data, the file holds {data_bytes}"
        )
    if end_of_data < data_bytes:
        raise damaged(
            f"weight file {name} is corrupted: {data_bytes - end_of_data} bytes after its last tensor are not "
            "described by its header"
        )
    return entries


def read_safetensors_headers(paths: Iterable[str | os.PathLike]) -> dict[str, TensorEntry]:
    """The headers of several files (a sharded checkpoint), merged; a tensor stored twice is refused."""
    entries: dict[str, TensorEntry] = {}
    for path in paths:
        for key, entry in read_safetensors_header(path).items():
            if key in entries:
                raise damaged(f"tensor {key} is stored twice, in {entries[key].file} and in {entry.file}")
            entries[key] = entry
    return entries


def _st_name(dtype: torch.dtype) -> str:
    return ST_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_module_tensors(name: str, spec: LinearSpec, entries: Mapping[str, TensorEntry],
                         where: str = "the checkpoint") -> None:
    """Every tensor ``spec`` promises for module ``name`` is in ``entries`` with its dtype and shape.

    The one check shared by ``from_pretrained`` (here) and ``qdlm-export inspect``/``push``/``eval``
    (``inspect.py``). A bias only has to be floating point: it is stored in the source's dtype."""
    for suffix, (dtype, shape) in spec.tensors().items():
        key = f"{name}.{suffix}"
        entry = entries.get(key)
        if entry is None:
            raise damaged(
                f"tensor {key} is missing from {where} (module {name} is listed as quantized in "
                "quantization_config)"
            )
        want = _st_name(dtype)
        if suffix == "bias" and dtype.is_floating_point:
            if entry.dtype not in ST_FLOAT_NAMES:
                raise damaged(f"tensor {key} in {entry.file} has dtype {entry.dtype}, expected a floating-point dtype")
        elif entry.dtype != want:
            raise damaged(
                f"tensor {key} in {entry.file} has dtype {entry.dtype}, expected {want} "
                f"({str(dtype).removeprefix('torch.')})"
            )
        if tuple(entry.shape) != tuple(shape):
            raise damaged(f"tensor {key} in {entry.file} has shape {list(entry.shape)}, expected {list(shape)}")
