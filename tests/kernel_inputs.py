"""What the kernel tests share: where Triton cases run, a freshly seeded generator, random packed weights."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from qdlm_export.core.packing import pack_rows

# Triton cases run compiled on a CUDA GPU, else in the CPU interpreter: tests/conftest.py sets
# TRITON_INTERPRET=1 at collection on machines without CUDA, before any Triton kernel is defined.
GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = torch.device("cuda" if GPU else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def fresh_generator() -> torch.Generator:
    """A generator with a new seed each run, printed so a failure replays with QDLM_TEST_SEED=<seed>."""
    seed = int(os.environ.get("QDLM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"QDLM_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def random_packed_weight(gen, n_out, k, bits, group, symmetric, scale_dtype=torch.float16):
    """Random codes, scales and zero points, and the weight packed by the *format* module:
    ``(codes uint8 [n_out, k], packed int32, scale [n_out, groups], zero uint8 or None)``."""
    groups = 1 if group == -1 else k // group
    codes = torch.randint(0, 1 << bits, (n_out, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n_out, groups, generator=gen) * 0.05 + 0.005).to(scale_dtype)
    zero = None if symmetric else torch.randint(0, 1 << bits, (n_out, groups), generator=gen, dtype=torch.uint8)
    return codes, pack_rows(codes, bits), scale, zero
