"""Owns the checkpoint format's Hadamard matrices: their one construction (torch only), used by all.

Methods, the loader (``transforms.py``), the kernels and self-contained checkpoints all take them from here.

``H(n)`` for ``n = m * p``, ``p`` the largest power of two dividing ``n`` divided by 4 and ``m = 4 * (odd
part of n)`` (``m = 1``, ``p = n`` when ``n`` is a power of two), is ``H_m (x) S_p / sqrt(n)`` (Kronecker
product, index ``i = a*p + b``), with ``S_p`` Sylvester's matrix (``S_1 = [1]``,
``S_2p = [[S_p, S_p], [S_p, -S_p]]``) and ``H_m`` the +-1 matrix of order ``m`` given by the first rule
that applies (docs/FORMAT.md, "Hadamard matrices"):

1. Paley I, when ``q = m - 1`` is a prime with ``q = 3 (mod 4)``: ``[[1, 1^T], [-1, Q + I]]``;
2. Paley II, when ``q = m/2 - 1`` is a prime or the square of an odd prime with ``q = 1 (mod 4)``: the
   conference matrix ``C = [[0, 1^T], [1, Q]]`` with each 0 replaced by ``[[1, -1], [-1, -1]]`` and each
   +-1 by ``+-[[1, 1], [1, -1]]``;
3. Williamson, for the orders of :data:`WILLIAMSON_ROWS` (``m = 4w``: 92, 116, 156, 172): the array
   ``[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]`` of the symmetric circulant
   matrices ``X[i, j] = x[(j - i) mod w]`` whose first rows the table holds.

``Q[a, b] = chi(a - b)`` is the Jacobsthal matrix of GF(q) (``chi`` the quadratic character) over the
field elements in index order (GF(p): ``a``; GF(p^2) = GF(p)[w]/(w^2 - r), ``r`` the least quadratic
non-residue mod p: ``a0 + a1 w`` has index ``a0 + p*a1``). Any other order is refused: sizes such as
188 * 2^k (no construction here) or 2 * odd (no Hadamard matrix exists) have no matrix in this format.

Every matrix is built on the CPU (whatever device context the caller is in: transformers loads models
under ``torch.device("meta")``) and cached; callers must not modify what they are given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

# First rows of Williamson matrices A, B, C, D of odd order w (symmetric circulant +-1 matrices with
# A^2 + B^2 + C^2 + D^2 = 4w I), for the orders 4w that neither Paley construction reaches. Encoding:
# bit i (least significant first) of the hex number is 1 when entry i of the row is -1. Data from the
# mathematical literature (w = 23, 29, 43: M. Hall, Combinatorial Theory, 2nd ed.; w = 39: S. London's
# 2013 thesis on Turyn-type sequences; both as tabulated by SageMath's Hadamard matrix library); each is
# checked by the tests (tests/core/test_hadamard_widths.py: symmetric rows, H H^T = 4w I).
WILLIAMSON_ROWS: dict[int, tuple[int, int, int, int]] = {
    23: (0x3BA5DC, 0x498192, 0x1CA538, 0x117E88),
    29: (0x735EB38, 0x17340B3A, 0x25C0E90, 0xDA2116C),
    39: (0x1AFB3CDF58, 0x1975BDAE98, 0xECF5AF370, 0x72BE247D4E),
    43: (0x385B3FCDA1C, 0x14D42F42B28, 0x207AC935E04, 0x730A26450CE),
}


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _field(q: int) -> tuple[int, int, int] | None:
    """(p, k, r) when q = p^k with k in {1, 2} (r: the non-residue defining GF(p^2)); else None."""
    if _is_prime(q):
        return q, 1, 0
    p = math.isqrt(q)
    if p * p == q and p > 2 and _is_prime(p):
        r = next(a for a in range(2, p) if pow(a, (p - 1) // 2, p) == p - 1)
        return p, 2, r
    return None


def construction(m: int) -> str | None:
    """How ``H_m`` is built (``"sylvester"``, ``"paley1"``, ``"paley2"``, ``"williamson"``), or None when
    this format has no matrix of order ``m``. Cheap: decides without building."""
    if m == 1:
        return "sylvester"
    if m < 4 or m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    q = m // 2 - 1
    if q > 1 and q % 4 == 1 and _field(q) is not None:
        return "paley2"
    if m // 4 in WILLIAMSON_ROWS:
        return "williamson"
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[a, b] = chi(a - b)`` over GF(q), elements in index order (int64)."""
    p, k, r = _field(q)  # type: ignore[misc]
    if k == 1:
        squares = {(a * a) % p for a in range(1, p)}
    else:  # (a0 + a1 w)^2 = (a0^2 + r a1^2) + (2 a0 a1) w
        squares = {
            (a0 * a0 + r * a1 * a1) % p + p * ((2 * a0 * a1) % p) for a0 in range(p) for a1 in range(p) if a0 or a1
        }
    chi = torch.tensor([0] + [1 if z in squares else -1 for z in range(1, q)], dtype=torch.int64)
    idx = torch.arange(q)
    if k == 1:
        diff = (idx[:, None] - idx[None, :]) % p
    else:  # subtraction is coordinate-wise: (a0 + a1 w) - (b0 + b1 w)
        a0, a1 = idx % p, idx // p
        diff = (a0[:, None] - a0[None, :]) % p + p * ((a1[:, None] - a1[None, :]) % p)
    return chi[diff]


def _paley1(m: int) -> torch.Tensor:
    q = m - 1
    H = torch.ones(m, m, dtype=torch.int64)
    H[1:, 0] = -1
    H[1:, 1:] = _jacobsthal(q) + torch.eye(q, dtype=torch.int64)
    return H


def _paley2(m: int) -> torch.Tensor:
    q = m // 2 - 1
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(C, plus) + torch.kron((C == 0).to(torch.int64), zero)


def williamson_row(bits: int, w: int) -> torch.Tensor:
    """A table row decoded: entry i is -1 where bit i is set (int64, length ``w``)."""
    return torch.tensor([-1 if (bits >> i) & 1 else 1 for i in range(w)], dtype=torch.int64)


def circulant(row: torch.Tensor) -> torch.Tensor:
    """``X[i, j] = row[(j - i) mod w]``."""
    w = row.shape[0]
    idx = torch.arange(w)
    return row[(idx[None, :] - idx[:, None]) % w]


def _williamson(m: int) -> torch.Tensor:
    w = m // 4
    A, B, C, D = (circulant(williamson_row(bits, w)) for bits in WILLIAMSON_ROWS[w])
    blocks = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]
    return torch.cat([torch.cat(row, 1) for row in blocks], 0)


def _on_cpu(build):
    """Build (and cache) on the CPU whatever device context the caller is in: a cached matrix built
    under ``torch.device("meta")`` would hold no data."""

    @functools.wraps(build)
    def wrapper(*args):
        with torch.device("cpu"):
            return build(*args)

    return wrapper


@functools.lru_cache(maxsize=None)
@_on_cpu
def small_hadamard(m: int) -> torch.Tensor:
    """The format's +-1 matrix ``H_m`` (int64, CPU, cached: do not modify) for ``m = 1`` or ``4 * odd``;
    ``ValueError`` naming the order when the format has none."""
    kind = construction(m)
    if kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.int64)
    if kind == "paley1":
        return _paley1(m)
    if kind == "paley2":
        return _paley2(m)
    if kind == "williamson":
        return _williamson(m)
    raise ValueError(
        f"no Hadamard matrix of order {m} is built in (Paley I needs {m - 1} a prime = 3 mod 4, Paley II needs "
        f"{m // 2 - 1} a prime or odd prime square = 1 mod 4, and the Williamson table holds orders "
        f"{', '.join(str(4 * w) for w in sorted(WILLIAMSON_ROWS))})"
    )


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``m`` the non-Sylvester factor (1 or 4*odd).
    ``ValueError`` when ``n`` is not a positive size of the form 2^k or 4 * odd * 2^k (2 * odd and odd
    sizes above 2 have no Hadamard matrix at all). Says nothing about whether ``H_m`` is built in."""
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
    """Whether this format defines ``H(n)`` (decided without building it)."""
    try:
        m, _ = hadamard_factors(n)
    except ValueError:
        return False
    return construction(m) is not None


def supported_sizes_near(n: int, count: int = 2) -> tuple[list[int], list[int]]:
    """Up to ``count`` sizes with a Hadamard matrix just below and just above ``n``, among the multiples
    of 64 for ``n >= 1024`` (model widths), of 4 otherwise (head counts, small dims)."""
    step = 64 if n >= 1024 else 4
    base = (n // step) * step
    below = [s for s in range(base if base < n else base - step, 0, -step) if has_hadamard(s)][:count]
    above: list[int] = []
    s = base + step
    while len(above) < count:
        if has_hadamard(s):
            above.append(s)
        s += step
    return below, above


def hadamard_unsupported_reason(n: int) -> str | None:
    """None when ``H(n)`` exists in this format; otherwise why not, with the nearest sizes that have one."""
    if has_hadamard(n):
        return None
    if n <= 0:
        return f"Hadamard size must be positive, got {n}"
    try:
        m, p = hadamard_factors(n)
        why = f"{n} = {m} * {p} and no Hadamard matrix of order {m} is built in"
    except ValueError:
        why = f"no Hadamard matrix of size {n} exists (a Hadamard size other than 1 and 2 is a multiple of 4)"
    below, above = supported_sizes_near(n)
    near = ", ".join(str(s) for s in sorted(below + above))
    return f"{why}; the nearest sizes with one are {near}"


def _checked_factors(n: int) -> tuple[int, int]:
    """:func:`hadamard_factors` for a size this format has a matrix of, else ``ValueError`` naming it."""
    reason = hadamard_unsupported_reason(n)
    if reason is not None:
        raise ValueError(reason)
    return hadamard_factors(n)


def sylvester(p: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """Sylvester's +-1 matrix ``S_p`` (``S[i, j] = (-1)**popcount(i & j)``) of a power-of-two order."""
    if p <= 0 or p & (p - 1):
        raise ValueError(f"Sylvester matrices have power-of-two orders, got {p}")
    S = torch.ones(1, 1, dtype=torch.float64, device="cpu")
    while S.shape[0] < p:
        S = torch.cat([torch.cat([S, S], 1), torch.cat([S, -S], 1)], 0)
    return S.to(dtype=dtype, device=device)


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None, normalized: bool = True
) -> torch.Tensor:
    """The format's ``n x n`` matrix ``H_m (x) S_p``, divided by ``sqrt(n)`` (orthogonal) when ``normalized``.

    Dense: for tests and small sizes. Apply large ones with :func:`hadamard_transform_reference`.
    """
    m, p = _checked_factors(n)
    S = sylvester(p)
    H = S if m == 1 else torch.kron(small_hadamard(m).to(torch.float64), S)
    if normalized:
        H = H / math.sqrt(n)
    return H.to(dtype=dtype, device=device)


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


def hadamard_transform_reference(
    x: torch.Tensor, sylvester: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` along the last dim (``n`` its size) in torch, in O(n log n + n*m): the
    definition every kernel matches.

    With ``x`` viewed as ``[..., m, p]`` (index ``i = a*p + b``), ``x (H_m (x) S_p) = H_m^T X S_p``.
    Computes in ``x``'s dtype (callers pass float32 or float64). ``sylvester`` replaces the butterflies
    of ``X S_p`` by an implementation of the same additions (the kernels' C one), never the rest.
    """
    n = x.shape[-1]
    m, p = _checked_factors(n)
    butterflies = sylvester or _sylvester_transform
    y = butterflies(x.reshape(*x.shape[:-1], m, p)) if p > 1 else x.reshape(*x.shape[:-1], m, p)
    if m > 1:
        Hm = small_hadamard(m).to(dtype=x.dtype, device=x.device)
        y = torch.matmul(Hm.t(), y)  # [m, m] @ [..., m, p]: contracts the m axis
    return y.reshape(x.shape) / math.sqrt(n)
