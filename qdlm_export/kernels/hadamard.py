"""Walsh-Hadamard transforms over the last dimension: the op, its backends, and the torch one.

:func:`hadamard_transform` is the op; its backends (fast_hadamard_transform's CUDA kernel, the Triton
FWHT of ``hadamard_triton.py``, the torch transform here) are registered at the end of this module,
which also makes the checkpoint transforms of ``core/transforms.py`` use it (see :func:`online_hadamard`).

The matrices are the checkpoint format's, built in one place: ``qdlm_export/core/hadamard.py`` (FORMAT.md,
"Hadamard matrices"). For ``n = m * p`` with ``p`` a power of two and ``m = 4 * (odd part of n)``
(``m = 1`` when ``n`` is a power of two), ``H_n = H_m (x) S_p`` where ``S_p`` is the natural-order
Sylvester matrix (``S[i, j] = (-1)**popcount(i & j)``, symmetric) and ``H_m`` comes from Paley I,
Paley II or the Williamson table. In the row-vector convention of ``F.linear``:

    hadamard_transform_torch(x, normalized=True, inverse=False)
        y = x @ H_n              (times 1/sqrt(n) when normalized: an orthogonal rotation)
        inverse=True computes x @ H_n.T, which undoes the normalized forward transform.
        With x viewed as [..., m, p]:  x @ H_n = H_m^T X S_p.
        Powers of two (and every symmetric H_m, e.g. Paley II) are involutions: forward == inverse.
    hadamard_matrix(n) -> the +-1 matrix H_n (float64 unless asked otherwise)

QuaRot's list of non-power-of-two orders (``get_hadK``: 12, 20, 28, 36, 40, 52, 60, 108, 140, 148,
156, 172) is covered; 40 never occurs as ``m`` here (``40 * 2**k`` splits as ``20 * 2**(k+1)``). Sizes
whose ``m`` has no matrix (e.g. 188 * 2**k) raise ``ValueError`` naming the nearest supported sizes.
"""

from __future__ import annotations

import functools
import math

import torch

from ..core.hadamard import (
    hadamard_factors,
    hadamard_unsupported_reason,
    small_hadamard,
    sylvester,
)
from ..core.hadamard import hadamard_matrix as _format_hadamard_matrix
from ..core.transforms import set_hadamard_backend
from ._triton import fast_hadamard_transform_available, triton_unavailable_reason
from .registry import Problem, choose, configured_backend, describe_backend, on_cuda, register_backend

# The orders of QuaRot's list that occur as ``m`` (40 is 20 * 2), all built in.
HADAMARD_ORDERS = (12, 20, 28, 36, 52, 60, 108, 140, 148, 156, 172)


def hadamard_k(k: int) -> torch.Tensor:
    """The +-1 matrix ``H_k`` of the non-Sylvester factor (int64, cached: do not modify)."""
    return small_hadamard(k)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def split_size(n: int) -> tuple[int, int]:
    """``n -> (m, p)``: ``p`` a power of two, ``m = 1`` (n a power of two) or ``4 * (odd part of n)``;
    raises ``ValueError`` when the format has no matrix of size ``n``."""
    reason = hadamard_unsupported_reason(n)
    if reason is not None:
        raise ValueError(f"no Hadamard transform of size {n}: {reason}")
    return hadamard_factors(n)


def sylvester_matrix(n: int, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """Natural-order Sylvester matrix ``S[i, j] = (-1)**popcount(i & j)`` of a power-of-two order."""
    return sylvester(n, dtype, device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device="cpu", normalized: bool = False) -> torch.Tensor:
    """The matrix ``H_n = H_m (x) S_p`` that :func:`hadamard_transform_torch` applies (``x @ H_n``)."""
    split_size(n)
    return _format_hadamard_matrix(n, dtype=dtype, device=device, normalized=normalized)


# ---------------------------------------------------------------------------------------------
# Torch transforms
# ---------------------------------------------------------------------------------------------

_SMALL = 128  # largest Sylvester block applied as one dense matmul


@functools.lru_cache(maxsize=64)
def _cached_sylvester(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return sylvester_matrix(n, dtype, device)


@functools.lru_cache(maxsize=64)
def cached_hadamard_k(k: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``H_k`` (``H_k.T`` when ``transpose``) in ``dtype`` on ``device`` (cached: read only)."""
    h = small_hadamard(k).to(torch.float64)
    return (h.T if transpose else h).contiguous().to(dtype=dtype, device=device)


def _fwht_rows(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester transform of each row of ``x [R, n]`` (n a power of two).

    ``S_{ab} = S_a (x) S_b``, so with a row viewed as ``[a, b]`` the transform is ``S_a X S_b``: two
    dense matmuls with blocks of at most 128 (BLAS-friendly; fewer passes than log2(n) butterflies).
    Larger rows recurse on the ``a`` axis.
    """
    R, n = x.shape
    if n == 1:
        return x.clone()
    if n <= _SMALL:
        return x @ _cached_sylvester(n, x.dtype, x.device)
    b = _SMALL
    a = n // b
    y = x.view(R, a, b) @ _cached_sylvester(b, x.dtype, x.device)
    if a <= _SMALL:
        return (_cached_sylvester(a, x.dtype, x.device) @ y).view(R, n)
    yt = _fwht_rows(y.transpose(1, 2).reshape(R * b, a))
    return yt.view(R, b, a).transpose(1, 2).reshape(R, n)


def apply_hadamard_k(y: torch.Tensor, k: int, inverse: bool) -> torch.Tensor:
    """The ``m`` axis of ``y [..., m, p]``: ``H_m^T @ y`` (forward, ``x @ H_n``), ``H_m @ y`` (inverse)."""
    if k == 1:
        return y
    return cached_hadamard_k(k, not inverse, y.dtype, y.device) @ y


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def hadamard_transform_torch(x: torch.Tensor, normalized: bool = True, inverse: bool = False) -> torch.Tensor:
    """``x @ H_n`` over the last dim (``x @ H_n.T`` when ``inverse``), scaled by 1/sqrt(n) when
    ``normalized``. Computed in float32 (float64 for float64 input) and returned in ``x.dtype``."""
    n = x.shape[-1]
    k, p = split_size(n)
    xf = x.reshape(-1, n).to(compute_dtype(x.dtype))
    y = _fwht_rows(xf.reshape(-1, p)).view(-1, k, p)
    y = apply_hadamard_k(y, k, inverse)
    if normalized:
        y = y * (1.0 / math.sqrt(n))
    return y.reshape(x.shape).to(x.dtype)


# Limits of the Triton kernel (hadamard_triton.py) and of fast_hadamard_transform, kept here so
# that checking them never imports triton.

TRITON_FWHT_MIN, TRITON_FWHT_MAX = 16, 16384
FHT_MAX = 32768  # fast_hadamard_transform's largest power of two


def triton_fwht_unsupported_reason(*, n: int, dtype: torch.dtype | None = None, **_: object) -> str | None:
    """None when the Triton FWHT takes rows of ``n`` (the power-of-two part), else why not."""
    if not _is_pow2(n):
        return f"{n} is not a power of two"
    if not TRITON_FWHT_MIN <= n <= TRITON_FWHT_MAX:
        return f"power-of-two size {n} is outside [{TRITON_FWHT_MIN}, {TRITON_FWHT_MAX}]"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{dtype} is not supported"
    return None


def fht_unsupported_reason(*, n: int, dtype: torch.dtype | None = None, **_: object) -> str | None:
    """None when ``fast_hadamard_transform.hadamard_transform`` takes rows of ``n`` (power of two)."""
    if not _is_pow2(n) or not 2 <= n <= FHT_MAX:
        return f"power-of-two size {n} is outside [2, {FHT_MAX}]"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{dtype} is not supported"
    return None


# ---------------------------------------------------------------------------------------------
# The op and its backends (highest priority first; `auto` takes the first that can run):
#   fast_hadamard_transform (CUDA) > triton (CUDA) > torch
# fast_hadamard_transform transforms the power-of-two axis, then H_m runs in torch; the Triton kernel
# applies H_m itself where a row fits one program (hadamard_triton.py). Triton and
# fast_hadamard_transform are imported on first use (see _triton.py).
# ---------------------------------------------------------------------------------------------


def _pow2_part(p: Problem) -> int | None:
    try:
        return split_size(p.n)[1] if p.n is not None else None
    except ValueError:
        return None


def _torch_unsupported(p: Problem) -> str | None:
    if p.n is None:
        return None
    try:
        split_size(p.n)
    except ValueError as exc:
        return str(exc)
    return None


def _triton_unsupported(p: Problem) -> str | None:
    pow2 = _pow2_part(p)
    if p.n is not None and pow2 is None:
        return _torch_unsupported(p)
    return triton_unavailable_reason(p.device) or (
        None if pow2 is None else triton_fwht_unsupported_reason(n=pow2, dtype=p.dtype)
    )


def _fht_unsupported(p: Problem) -> str | None:
    if not fast_hadamard_transform_available():
        return "fast_hadamard_transform is not installed (pip install 'qdlm-export[cuda]')"
    if p.device.type != "cuda":
        return "fast_hadamard_transform needs CUDA tensors"
    pow2 = _pow2_part(p)
    if p.n is not None and pow2 is None:
        return _torch_unsupported(p)
    return None if pow2 is None else fht_unsupported_reason(n=pow2, dtype=p.dtype)


def with_hadamard_k(pow2_fn):
    """A full transform from a power-of-two one: ``pow2_fn`` on the 2**m axis, then H_m in torch."""

    def run(x: torch.Tensor, normalized: bool = True, inverse: bool = False) -> torch.Tensor:
        n = x.shape[-1]
        k, p = split_size(n)  # S_p is symmetric: forward and inverse differ only in H_m
        scale = n**-0.5 if normalized else 1.0
        if k == 1:
            return pow2_fn(x, scale)
        y = pow2_fn(x.reshape(-1, k, p), scale)
        y = apply_hadamard_k(y.to(compute_dtype(x.dtype)), k, inverse)
        return y.reshape(x.shape).to(x.dtype)

    return run


def _fht_pow2(x: torch.Tensor, scale: float) -> torch.Tensor:
    import fast_hadamard_transform

    return fast_hadamard_transform.hadamard_transform(x, scale)


def _hadamard_triton(x: torch.Tensor, normalized: bool = True, inverse: bool = False) -> torch.Tensor:
    from .hadamard_triton import hadamard_triton

    return hadamard_triton(x, normalized, inverse)


register_backend(
    "hadamard", "fast_hadamard_transform", with_hadamard_k(_fht_pow2), family="fast_hadamard_transform",
    priority=30, unsupported=_fht_unsupported, summary="fast_hadamard_transform CUDA kernel, then H_m",
)
register_backend(
    "hadamard", "triton", _hadamard_triton, family="triton", priority=20, unsupported=_triton_unsupported,
    auto=on_cuda, summary="Triton FWHT as Sylvester matmuls, with H_m in the same kernel where a row fits",
)
register_backend(
    "hadamard", "torch", hadamard_transform_torch, family="torch", priority=0,
    unsupported=_torch_unsupported, summary="blocked Sylvester matmuls, then H_m",
)


def hadamard_transform(
    x: torch.Tensor, normalized: bool = True, inverse: bool = False, *, backend: str | None = None
) -> torch.Tensor:
    """Walsh-Hadamard transform over the last dim: ``x @ H_n`` (``x @ H_n.T`` when ``inverse``), scaled
    by 1/sqrt(n) when ``normalized``. ``H_n`` is the checkpoint format's matrix (``core/hadamard.py``)."""
    b = choose("hadamard", x.device, backend, n=x.shape[-1], dtype=x.dtype)
    return b.impl(x, normalized, inverse)


def online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The normalised ``x @ H_n`` of a checkpoint's online transforms (``core.transforms``): through
    :func:`hadamard_transform` on a GPU or when a backend is forced, else the format's reference (bit
    for bit what the in-memory quantized model computes; its butterflies in C where that runs)."""
    if x.device.type == "cuda" or configured_backend() != "auto":
        return hadamard_transform(x)
    from .cpu_hadamard import hadamard_reference_cpu

    return hadamard_reference_cpu(x)


def describe_online_hadamard(device: torch.device | str, n: int) -> str:
    """What :func:`online_hadamard` runs for float32 rows of ``n`` on ``device`` (``inspect``)."""
    if torch.device(device).type == "cuda" or configured_backend() != "auto":
        return describe_backend("hadamard", device, n=n, dtype=torch.float32)
    from .cpu_native import library

    how = "its butterflies in C" if library() is not None else "in torch"
    return f"the format's reference ({how}, bit for bit what the in-memory quantized model computes)"


# core may not import kernels: it exposes a hook, and importing the kernels plugs the dispatch in.
set_hadamard_backend(online_hadamard)
