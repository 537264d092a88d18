"""Kernel choices measured on one GPU model, shipped as data: what the tile sweep timed fastest there.

A table is one JSON file per GPU model in ``kernels/tuned/``, named by :func:`table_name` of the
device name (``NVIDIA H200`` -> ``nvidia-h200.json``). ``benchmarks/triton_sweep.py --table`` writes
it from the candidates it timed; ``benchmarks/gpu_check.sh`` runs the sweep before it benchmarks, so
the check's numbers are the tuned kernels'. Each entry is one measured problem::

    {"op": "weight_only", "K": 4096, "N": 12288, "M": 16, "backend": "triton",
     "config": {"BLOCK_M": 16, ...}, "vs_dense": 1.21, "vs_heuristic": 1.35}

``op`` is ``weight_only`` (4-bit codes, bf16/fp16 activations: what the sweep measures), ``int8``
(the W8A8 GEMM) or ``w4a4`` (the packed 4-bit integer GEMM, per channel); ``backend`` is the
registry's name of what won (``triton``, ``triton_dequant``, ``cuda_tinygemm``); ``config`` its
tile configuration when it is a Triton GEMM's.

For a call: the entries of the same op at the measured shape nearest to the call's ``K x N`` (in log
scale: the sweep measures a few dLLM shapes), and among those the one at the smallest measured ``M``
at or above the call's (else the largest). Read by the Triton launchers (the entry's tile
configuration replaces the heuristic's) and by ``auto`` (``registry.register_preference``: the
backend that won, when it can run the layer; never torch's tinygemm, which holds a second copy of the
weight). The weight-only entries apply to grouped 4-bit codes with 16-bit activations, what the sweep
measures. No table for the device, or no CUDA: the heuristics.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from pathlib import Path

import torch

from .registry import forget_selections

TABLE_DIR = Path(__file__).with_name("tuned")
OPS = ("weight_only", "int8", "w4a4")
BACKENDS = ("triton", "triton_dequant", "cuda_tinygemm")


def table_name(device_name: str) -> str:
    """The file name of a GPU model's table: its name in lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ".json"


TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")  # every tile configuration has these
OPTIONAL_KEYS = {"GROUP_M": int, "SPLIT_K": int, "SWAP_AB": bool, "OFFSET_CODES": bool}


def _valid_config(config: object) -> bool:
    if not isinstance(config, dict) or not all(isinstance(config.get(k), int) and config[k] > 0 for k in TILE_KEYS):
        return False
    extra = set(config) - set(TILE_KEYS)
    return all(k in OPTIONAL_KEYS and isinstance(config[k], OPTIONAL_KEYS[k]) for k in extra)


def _valid(entry: object) -> bool:
    return (isinstance(entry, dict) and entry.get("op") in OPS and entry.get("backend") in BACKENDS
            and all(isinstance(entry.get(k), int) and entry[k] > 0 for k in ("K", "N", "M"))
            and (_valid_config(entry.get("config")) if entry.get("backend") == "triton" else entry.get("config") is None))


@functools.cache
def load_table(device_name: str) -> tuple[dict, ...]:
    """The entries of the table for ``device_name`` (empty without one). A table that cannot be read is
    reported once as a warning and left out: the heuristics still run."""
    path = TABLE_DIR / table_name(device_name)
    if not path.is_file():
        return ()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        if not isinstance(entries, list) or not all(_valid(e) for e in entries):
            raise ValueError("an entry lacks op/backend/K/N/M, or has unknown values or tile keys")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring the tuned kernel table {path}: {exc}", stacklevel=2)
        return ()
    return tuple(entries)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def entry(op: str, M: int, N: int, K: int, device: torch.device) -> dict | None:
    """The measured entry that stands for ``op`` at ``M x K -> N`` on ``device`` (see the module), or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _entry(op, M, N, K, _device_name(index))


@functools.lru_cache(maxsize=4096)
def _entry(op: str, M: int, N: int, K: int, device_name: str) -> dict | None:
    rows = [e for e in load_table(device_name) if e["op"] == op]
    if not rows or min(M, N, K) <= 0:
        return None

    def distance(e: dict) -> float:
        return abs(math.log(e["N"] / N)) + abs(math.log(e["K"] / K))

    nearest = min(map(distance, rows))
    rows = [e for e in rows if distance(e) == nearest]
    covering = [e for e in rows if e["M"] >= M]
    return min(covering, key=lambda e: e["M"]) if covering else max(rows, key=lambda e: e["M"])


def tile_config(op: str, M: int, N: int, K: int, device: torch.device) -> dict | None:
    """The measured tile configuration for a Triton GEMM launch, when the entry that stands for it is
    one (a copy: callers adapt it)."""
    found = entry(op, M, N, K, device)
    if found is None or found["backend"] != "triton":
        return None
    return {"GROUP_M": 8, **found["config"]}  # the sweep's candidates all group 8 row tiles


_GENERATION = [0]


def generation() -> int:
    """Counts :func:`forget` calls: what launchers key their held launch plans by, so that a table read
    again is what the next launch uses."""
    return _GENERATION[0]


def forget() -> None:
    """Read the tables again at the next lookup (after one was written, or in tests), and have ``auto``
    choose again (launch plans made from the old tables are dropped too: :func:`generation`)."""
    _GENERATION[0] += 1
    load_table.cache_clear()
    _entry.cache_clear()
    _device_name.cache_clear()
    forget_selections()
