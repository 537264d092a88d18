"""The one place that imports Triton. Everything else asks this module whether Triton can run.

Triton is optional: ``import qdlm_export.kernels`` must work without it. The Triton kernel modules
(``*_triton.py``) import ``triton`` at their top and are themselves imported lazily, the first time a
Triton backend actually runs. That matters for the interpreter: ``triton.jit`` decides *when a kernel
is defined* whether it is compiled for a GPU or interpreted on the CPU (``TRITON_INTERPRET=1``), so
the variable must be set before the first Triton kernel runs, not merely before it is called.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    """Installed Triton version, or None when Triton cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # pragma: no cover - a broken install counts as absent
        return None
    return str(triton.__version__)


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None if a Triton kernel can run on tensors of ``device``; otherwise why not."""
    if triton_version() is None:
        return "triton is not installed (pip install 'qdlm-export[triton]')"
    dev = torch.device(device)
    if dev.type == "cuda":
        return None
    if dev.type == "cpu" and interpret_mode():
        return None
    return f"tensors on {dev.type} need CUDA (or TRITON_INTERPRET=1 for CPU tests)"


def cuda_capability(index: int | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` of CUDA device ``index`` (the current one when None), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return _capability_of(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    """Asked once per device: the tile heuristics ask on every call."""
    return tuple(torch.cuda.get_device_capability(index))


def cuda_arch(device: torch.device | str | None = None) -> int | None:
    """``device``'s compute capability as one number (90 for sm_90; the current CUDA device when None),
    None on the CPU or without CUDA. The tile heuristics ask it, each with its own rule.

    ``benchmarks/triton_compile_check.py`` replaces it in the kernel modules that ask, to compile
    their picks for a GPU this machine does not have."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    capability = cuda_capability(None if device is None else torch.device(device).index)
    return None if capability is None else capability[0] * 10 + capability[1]


def datacenter_hopper_or_blackwell(arch: int | None) -> bool:
    """sm_90 to sm_10x: 227 KiB of shared memory a block and the register budget the Hopper-tuned tiles
    were measured with. Not consumer Blackwell (sm_120: 99 KiB, where those tiles spill)."""
    return arch is not None and 90 <= arch < 120


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. ``triton.cdiv`` also works on the host, but it goes through
    Triton's JIT-function call path: about 5 us per use, paid on every forward of every layer."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1); host-side, for the same reason as :func:`cdiv`."""
    return 1 << max(n - 1, 0).bit_length()


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast ``dtype`` operands to fp32 before ``tl.dot``.

    The interpreter keeps bfloat16 tiles as raw uint16 and ``tl.dot`` then multiplies the bit
    patterns (checked with triton 3.9), so interpreted kernels convert bf16 tiles to fp32 first. On a
    GPU the bf16 tiles go to the tensor cores unchanged.
    """
    return interpret_mode() and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def fast_hadamard_transform_available() -> bool:
    """Whether Dao-AILab's ``fast_hadamard_transform`` CUDA extension can be imported."""
    if importlib.util.find_spec("fast_hadamard_transform") is None:
        return False
    try:
        import fast_hadamard_transform  # noqa: F401
    except Exception:  # pragma: no cover - needs the CUDA extension
        return False
    return True
