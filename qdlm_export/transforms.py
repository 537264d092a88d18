"""Online input transforms of a quantized linear, as data, and their torch implementation.

A weight-activation method (SmoothQuant, QuaRot, DuQuant) makes a linear's *input* easier to
quantize by transforming it: ``x -> x T``, with the inverse folded into the stored weight
(``W -> W T^-T``), so ``(x T)(W T^-T)^T = x W^T``. What the loader must apply at run time is stored
per module in ``quantization_config.transforms.modules[NAME]`` as a list of ops, applied in order
to ``x [..., in]`` (docs/FORMAT.md, "Transforms and activations"):

    {"op": "smooth"}                                        x / NAME.input_smooth            [in]
    {"op": "hadamard", "size": n, "stride": s}              x viewed [..., in/(n*s), n, s], times the
                                                            normalised n x n Hadamard along n
    {"op": "block_rotation", "tensor": T, "block_size": b}  x viewed [..., in/b, b], block k times
                                                            NAME.T[k] (NAME.T is [in/b or 1, b, b])
    {"op": "permute", "tensor": T}                          x[..., NAME.T]                   int64 [in]

Two more ops mark where quantization happens; they reference no transform tensors and are handled
by ``activations.py``: ``{"op": "quantize_input"}`` (last of the list: the transformed input is
quantized with the checkpoint's ``activations`` settings) and ``{"op": "quantize_output"}`` (the
linear's output is quantized per token with ``activations.qkv_bits``).

Everything here is in the row-vector convention of ``F.linear``: an op with matrix ``T`` maps
``x`` to ``x @ T``. The Hadamard matrices are deterministic functions of their size, defined in
:func:`hadamard_matrix` (and in FORMAT.md), so checkpoints store no Hadamard tensors.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Iterable, Mapping

import torch

TRANSFORM_OPS = ("smooth", "hadamard", "block_rotation", "permute")
QUANTIZE_OPS = ("quantize_input", "quantize_output")

SMOOTH_TENSOR = "input_smooth"


# ---- Hadamard matrices ------------------------------------------------------------------------------
#
# H(n) for n = m * 2^k is the Kronecker product H_m (x) S_{2^k}, where S is Sylvester's matrix
# (S_1 = [1], S_2p = [[S_p, S_p], [S_p, -S_p]]) and m is n's odd part times 4 (m = 1 when n is a
# power of two). H_m comes from Paley's constructions over GF(q):
#   Paley I  when m - 1 = q is a prime with q = 3 (mod 4):   [[1, 1^T], [-1, Q + I]]
#   Paley II otherwise, when m/2 - 1 = q is a prime or the square of a prime with q = 1 (mod 4):
#            the conference matrix C = [[0, 1^T], [1, Q]] with each 0 replaced by [[1, -1], [-1, -1]]
#            and each +-1 by +-[[1, 1], [1, -1]]
# where Q[a, b] = chi(a - b) is the quadratic character (Jacobsthal matrix) over the elements of
# GF(q) in the order of their index (GF(p): a; GF(p^2) = GF(p)[w]/(w^2 - r), r the least non-residue:
# a0 + a1 w has index a0 + p*a1). This covers the factors the dLLMs need (12 for LLaDA's 12288, 28
# and 148 for Dream's 3584/28 heads and 18944) and 20, 36, 40, 44, 52, 60, 108, 140 among others;
# 156 and 172 (no Paley construction) are refused.


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _field(q: int) -> tuple[int, int, int] | None:
    """(p, k, r) when q = p^k with k in {1, 2} (r: the non-residue defining GF(p^2)); else None."""
    if _is_prime(q):
        return q, 1, 0
    p = math.isqrt(q)
    if p * p == q and _is_prime(p) and p > 2:
        r = next(a for a in range(2, p) if pow(a, (p - 1) // 2, p) == p - 1)
        return p, 2, r
    return None


def _quadratic_character(q: int) -> list[int]:
    """chi(z) for every element of GF(q) by index: 0 for zero, +1 for squares, -1 otherwise."""
    p, k, r = _field(q)  # type: ignore[misc]
    if k == 1:
        squares = {(a * a) % p for a in range(1, p)}
        return [0] + [1 if z in squares else -1 for z in range(1, p)]
    squares = set()
    for a0 in range(p):
        for a1 in range(p):
            if a0 or a1:  # (a0 + a1 w)^2 = a0^2 + r a1^2 + 2 a0 a1 w
                squares.add(((a0 * a0 + r * a1 * a1) % p) + p * ((2 * a0 * a1) % p))
    return [0] + [1 if z in squares else -1 for z in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q), elements in index order."""
    p, k, _ = _field(q)  # type: ignore[misc]
    chi = torch.tensor(_quadratic_character(q), dtype=torch.int64)
    idx = torch.arange(q)
    if k == 1:
        diff = (idx[:, None] - idx[None, :]) % p
    else:  # subtract coordinate-wise: (a0 + a1 w) - (b0 + b1 w)
        a0, a1 = idx % p, idx // p
        diff = (a0[:, None] - a0[None, :]) % p + p * ((a1[:, None] - a1[None, :]) % p)
    return chi[diff]


def _on_cpu(build):
    """Build (and cache) on the CPU whatever device context the caller is in: transformers loads
    models under ``torch.device("meta")``, and a cached matrix built there would hold no data."""

    @functools.wraps(build)
    def wrapper(*args):
        with torch.device("cpu"):
            return build(*args)

    return wrapper


@functools.lru_cache(maxsize=None)
@_on_cpu
def _paley(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order m by Paley's constructions, or None when neither applies."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        Q = _jacobsthal(q)
        H = torch.ones(m, m, dtype=torch.int64)
        H[1:, 0] = -1
        H[1:, 1:] = Q + torch.eye(q, dtype=torch.int64)
        return H
    if m % 2 == 0:
        q = m // 2 - 1
        if q > 1 and q % 4 == 1 and _field(q) is not None:
            C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
            C[0, 1:] = 1
            C[1:, 0] = 1
            C[1:, 1:] = _jacobsthal(q)
            plus = torch.tensor([[1, 1], [1, -1]])
            zero = torch.tensor([[1, -1], [-1, -1]])
            H = torch.kron(C, plus) + torch.kron((C == 0).to(torch.int64), zero)
            return H
    return None


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``m`` the non-Sylvester factor (1 or 4*odd)."""
    if n <= 0:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    p = n & -n  # largest power of two dividing n
    odd = n // p
    if odd == 1:
        return 1, n
    if p < 4:
        raise ValueError(f"no Hadamard matrix of size {n}: a Hadamard size other than 1 and 2 is a multiple of 4")
    return 4 * odd, p // 4


def has_hadamard(n: int) -> bool:
    try:
        m, _ = hadamard_factors(n)
    except ValueError:
        return False
    return m == 1 or _paley(m) is not None


@functools.lru_cache(maxsize=None)
@_on_cpu
def _small_factor(m: int) -> torch.Tensor:
    H = _paley(m)
    if H is None:
        raise ValueError(
            f"no Hadamard matrix of order {m} is built in (Paley I needs {m - 1} prime = 3 mod 4, Paley II "
            f"needs {m // 2 - 1} a prime or prime square = 1 mod 4)"
        )
    return H


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised (orthogonal) ``n x n`` Hadamard matrix of this format: ``H_m (x) S_p / sqrt(n)``.

    Dense: for tests and small sizes. Apply large ones with :func:`hadamard_transform`.
    """
    m, p = hadamard_factors(n)
    S = torch.ones(1, 1, dtype=torch.float64)
    while S.shape[0] < p:
        S = torch.cat([torch.cat([S, S], 1), torch.cat([S, -S], 1)], 0)
    H = S if m == 1 else torch.kron(_small_factor(m).to(torch.float64), S)
    return (H / math.sqrt(n)).to(dtype=dtype, device=device)


def _sylvester_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ S_p`` along the last dim (p a power of two), unnormalised, by butterflies."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` along the last dim (``n`` = its size).

    On a GPU (or when ``QDLM_KERNEL_BACKEND`` forces a backend) it runs through the kernel dispatch
    (fast-hadamard-transform, Triton, or torch: ``kernels/hadamard.py``, which reproduces these exact
    matrices); otherwise :func:`hadamard_transform_reference`.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"last dimension {x.shape[-1]} is not the Hadamard size {n}")
    if x.device.type == "cuda" or os.environ.get("QDLM_KERNEL_BACKEND", "auto").strip().lower() not in ("", "auto"):
        from .kernels import hadamard_transform as kernel_hadamard_transform

        return kernel_hadamard_transform(x)
    return hadamard_transform_reference(x)


def hadamard_transform_reference(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` in torch, in O(n log n + n*m): the definition every kernel matches.

    With ``x`` viewed as ``[..., m, p]`` (index ``i = a*p + b``), ``x (H_m (x) S_p) = H_m^T X S_p``.
    Computes in ``x``'s dtype (callers pass float32 or float64).
    """
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    y = _sylvester_transform(x.reshape(*x.shape[:-1], m, p)) if p > 1 else x.reshape(*x.shape[:-1], m, p)
    if m > 1:
        Hm = _small_factor(m).to(dtype=x.dtype, device=x.device)
        y = torch.matmul(Hm.t(), y)  # [m, m] @ [..., m, p]: contracts the m axis
    return y.reshape(x.shape) / math.sqrt(n)


def random_hadamard_signs(n: int, seed: int) -> torch.Tensor:
    """The +-1 diagonal ``D`` of a randomised Hadamard rotation ``D H(n)`` (float64, from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


# ---- the ops ----------------------------------------------------------------------------------------


def _grouped_hadamard(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    d = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(*lead, d // (size * stride), size, stride)
    if stride > 1:
        y = hadamard_transform(y.transpose(-1, -2), size).transpose(-1, -2)
    else:
        y = hadamard_transform(y.reshape(*lead, d // size, size), size)
    return y.reshape(x.shape)


def _block_rotation(x: torch.Tensor, rotation: torch.Tensor, block: int) -> torch.Tensor:
    d = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, d // block, block).transpose(0, 1)  # [blocks, tokens, b]
    y = torch.matmul(y, rotation.to(dtype=x.dtype, device=x.device))  # [blocks or 1, b, b] broadcasts
    return y.transpose(0, 1).reshape(*lead, d)


def apply_op(x: torch.Tensor, op: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One op on ``x [..., in]`` (see the module docstring)."""
    kind = op["op"]
    if kind == "smooth":
        return x / tensors[op.get("tensor", SMOOTH_TENSOR)].to(dtype=x.dtype, device=x.device)
    if kind == "hadamard":
        return _grouped_hadamard(x, int(op["size"]), int(op.get("stride", 1)))
    if kind == "block_rotation":
        return _block_rotation(x, tensors[op["tensor"]], int(op["block_size"]))
    if kind == "permute":
        return x[..., tensors[op["tensor"]].to(x.device)]
    raise ValueError(f"unknown transform op {kind!r}")


def transform_ops(ops: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ops of a module's list that transform its input (without the quantize markers)."""
    return [op for op in ops if op["op"] not in QUANTIZE_OPS]


def apply_input_transforms(
    x: torch.Tensor, ops: Iterable[Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Apply a module's transform ops, in order, to its input ``x [..., in]``. Quantize markers are
    skipped (``activations.py`` handles them)."""
    for op in transform_ops(ops):
        x = apply_op(x, op, tensors)
    return x


def transform_weight(
    weight: torch.Tensor, ops: Iterable[Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The weight ``W T^-T`` that, fed the transformed input ``x T``, computes ``x W^T``.

    Every op but ``smooth`` is orthogonal (``T^-T = T``), so the weight's rows go through the same
    ops as the input; ``smooth`` divides the input by ``s`` and so multiplies the weight's columns.
    Computed in float64, returned in float32.
    """
    w = weight.detach().to(torch.float64)
    for op in transform_ops(ops):
        if op["op"] == "smooth":
            w = w * tensors[op.get("tensor", SMOOTH_TENSOR)].to(torch.float64)
        else:
            w = apply_op(w, op, tensors)
    return w.to(torch.float32)


def transform_tensor_specs(
    ops: Iterable[Mapping[str, Any]], in_features: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Suffix -> (dtype, shape) of the tensors a module's ops reference; validates the ops' sizes."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for op in ops:
        kind = op.get("op")
        if kind in QUANTIZE_OPS:
            continue
        if kind == "smooth":
            specs[op.get("tensor", SMOOTH_TENSOR)] = (torch.float32, (in_features,))
        elif kind == "hadamard":
            size, stride = int(op["size"]), int(op.get("stride", 1))
            if size <= 0 or stride <= 0 or in_features % (size * stride):
                raise ValueError(f"hadamard op of size {size} and stride {stride} does not tile {in_features} inputs")
            if not has_hadamard(size):
                raise ValueError(f"no Hadamard matrix of size {size} is defined by this format version")
        elif kind == "block_rotation":
            block = int(op["block_size"])
            if block <= 0 or in_features % block:
                raise ValueError(f"block_rotation block size {block} does not divide {in_features} inputs")
            blocks = int(op.get("blocks", in_features // block))
            if blocks not in (1, in_features // block):
                raise ValueError(f"block_rotation has {blocks} rotations; expected 1 (shared) or {in_features // block}")
            specs[op["tensor"]] = (torch.float32, (blocks, block, block))
        elif kind == "permute":
            specs[op["tensor"]] = (torch.int64, (in_features,))
        else:
            raise ValueError(f"unknown transform op {kind!r}")
    return specs
