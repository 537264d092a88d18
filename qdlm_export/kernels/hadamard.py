"""Walsh-Hadamard transforms over the last dimension, torch backend, and the Hadamard matrices behind them.

The matrices are those of the checkpoint format (``qdlm_export/transforms.py``, FORMAT.md): for
``n = m * p`` with ``p`` a power of two and ``m = 4 * (odd part of n)`` (``m = 1`` when ``n`` is a power
of two), ``H_n = H_m (x) S_p`` where ``S_p`` is the natural-order Sylvester matrix
(``S[i, j] = (-1)**popcount(i & j)``, symmetric). In the row-vector convention of ``F.linear``:

    hadamard_transform_torch(x, normalized=True, inverse=False)
        y = x @ H_n              (times 1/sqrt(n) when normalized: an orthogonal rotation)
        inverse=True computes x @ H_n.T, which undoes the normalized forward transform.
        With x viewed as [..., m, p]:  x @ H_n = H_m^T X S_p.
        Powers of two (and every symmetric H_m, e.g. Paley II) are involutions: forward == inverse.
    hadamard_matrix(n) -> the +-1 matrix H_n (float64 unless asked otherwise)

The order-``m`` matrices are *constructed* here, never tabulated; the tests check ``H H^T = m I``
for each and compare with ``transforms.hadamard_matrix``. The rule (the format's):

* Paley I when ``q = m - 1`` is a prime with ``q = 3 (mod 4)``: ``[[1, 1^T], [-1, Q + I]]``;
* otherwise Paley II when ``q = m/2 - 1`` is a prime or the square of an odd prime with
  ``q = 1 (mod 4)``: the conference matrix ``C = [[0, 1^T], [1, Q]]`` with each 0 replaced by
  ``[[1, -1], [-1, -1]]`` and each +-1 by ``+-[[1, 1], [1, -1]]``;

with ``Q[a, b] = chi(a - b)`` the Jacobsthal matrix of GF(q) (``chi`` the quadratic character),
elements in index order (GF(p): ``a``; GF(p^2) = GF(p)[w]/(w^2 - r), r the least non-residue:
``a0 + a1 w`` has index ``a0 + p*a1``). For QuaRot's list (``get_hadK``) that gives

====  ===================================  ====  ==========================================
m     construction                         m     construction
====  ===================================  ====  ==========================================
12    Paley I, q = 11                      60    Paley I, q = 59
20    Paley I, q = 19                      108   Paley I, q = 107
28    Paley II, q = 13                     140   Paley I, q = 139
36    Paley II, q = 17                     148   Paley II, q = 73
52    Paley II, q = 25 (GF(5^2))           156   Goethals-Seidel (below; not in the format)
====  ===================================  ====  ==========================================

and every other order the two Paley constructions reach (44, 68, 76, 84, ...). **40** is QuaRot's
too, but ``40 * 2**k`` splits as ``20 * 2**(k+1)`` here (m is always 4 times an odd number);
:func:`hadamard_k` still builds it (Sylvester doubling of the order-20 matrix).

**156** (= 12 * 13) has no Paley construction. It is built by the Goethals-Seidel array from
T-matrices of order 3 and Williamson matrices of order 13, the latter found by a deterministic
meet-in-the-middle search over the 2**7 symmetric first rows (milliseconds). The checkpoint format
refuses 156, so it only matters to callers of this module.

Not built: **172** (= 4 * 43). Neither Paley construction applies (171 and 85 are not prime
powers) and the known constructions need Williamson (or T-) matrices of order 43 from a large
computer search that we cannot reproduce and verify here; ``172 * 2**k`` raises ``ValueError``.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

HADAMARD_ORDERS = (12, 20, 28, 36, 40, 52, 60, 108, 140, 148, 156)  # QuaRot's list, all built here
UNSUPPORTED_ORDERS = {
    172: "no Hadamard matrix of order 172 can be built and verified here (it needs Williamson or "
    "T-matrices of order 43 from a computer search); use a size with another factor"
}


# ---------------------------------------------------------------------------------------------
# Constructions (numpy int8 matrices of +-1)
# ---------------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _field(q: int) -> tuple[int, int] | None:
    """``(p, r)`` when GF(q) is implemented: q prime (r = 0) or q = p^2, p an odd prime (r: the least
    quadratic non-residue mod p, so that w^2 = r defines GF(p^2)); else None."""
    if _is_prime(q):
        return q, 0
    p = math.isqrt(q)
    if p * p == q and p > 2 and _is_prime(p):
        return p, next(a for a in range(2, p) if pow(a, (p - 1) // 2, p) == p - 1)
    return None


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[a, b] = chi(a - b)`` over GF(q), elements in index order (see the module docstring)."""
    field = _field(q)
    if field is None:
        raise ValueError(f"GF({q}) is not implemented (only primes and squares of odd primes)")
    p, r = field
    idx = np.arange(q)
    if r == 0:
        squares = {(a * a) % p for a in range(1, p)}
        diff = (idx[:, None] - idx[None, :]) % p
    else:
        # (a0 + a1 w)^2 = (a0^2 + r a1^2) + (2 a0 a1) w
        squares = {
            (a0 * a0 + r * a1 * a1) % p + p * ((2 * a0 * a1) % p) for a0 in range(p) for a1 in range(p) if a0 or a1
        }
        a0, a1 = idx % p, idx // p  # subtraction is coordinate-wise
        diff = (a0[:, None] - a0[None, :]) % p + p * ((a1[:, None] - a1[None, :]) % p)
    chi = np.array([0] + [1 if z in squares else -1 for z in range(1, q)], dtype=np.int64)
    return chi[diff]


def paley_1(q: int) -> np.ndarray:
    """Paley I, q prime with ``q = 3 (mod 4)``: order q + 1.

    ``Q`` is skew-symmetric with ``Q Q^T = q I - J``. Bordering it gives the skew matrix
    ``S = [[0, 1^T], [-1, Q]]`` with ``S S^T = q I``, and ``H = I + S = [[1, 1^T], [-1, Q + I]]``
    has ``H H^T = (q + 1) I``.
    """
    if q % 4 != 3 or not _is_prime(q):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    Q = _jacobsthal(q)
    S = np.zeros((q + 1, q + 1), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return (np.eye(q + 1, dtype=np.int64) + S).astype(np.int8)


def paley_2(q: int) -> np.ndarray:
    """Paley II, q a prime or odd prime square with ``q = 1 (mod 4)``: order 2(q + 1), symmetric.

    ``Q`` is symmetric; ``C = [[0, 1^T], [1, Q]]`` is a symmetric conference matrix (``C C^T = q I``,
    zero diagonal). Replacing each 0 of C by ``[[1, -1], [-1, -1]]`` and each +-1 by
    ``+-[[1, 1], [1, -1]]`` gives a Hadamard matrix.
    """
    if q % 4 != 1 or _field(q) is None:
        raise ValueError(f"Paley II needs a prime or odd prime square q = 1 mod 4, got {q}")
    Q = _jacobsthal(q)
    C = np.zeros((q + 1, q + 1), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    plus = np.array([[1, 1], [1, -1]])
    zero = np.array([[1, -1], [-1, -1]])
    return (np.kron(C, plus) + np.kron(np.eye(q + 1, dtype=np.int64), zero)).astype(np.int8)


def paley(m: int) -> np.ndarray | None:
    """The format's order-m matrix: Paley I if it applies, else Paley II, else None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley_1(m - 1)
    q = m // 2 - 1
    if m % 2 == 0 and q > 1 and q % 4 == 1 and _field(q) is not None:
        return paley_2(q)
    return None


def sylvester(h: np.ndarray) -> np.ndarray:
    """``[[H, H], [H, -H]]``: a Hadamard matrix of twice the order."""
    return np.block([[h, h], [h, -h]]).astype(np.int8)


def _circulant(row: np.ndarray) -> np.ndarray:
    n = len(row)
    idx = np.arange(n)
    return row[(idx[None, :] - idx[:, None]) % n]


@functools.lru_cache(maxsize=None)
def williamson_rows(n: int) -> tuple[tuple[int, ...], ...]:
    """First rows of Williamson matrices of odd order ``n`` (small n): symmetric circulant
    ``A, B, C, D`` with ``A^2 + B^2 + C^2 + D^2 = 4n I``.

    For symmetric circulants that identity says the periodic autocorrelations add up to zero at
    every nonzero shift. We enumerate every symmetric +-1 row (``2**((n+1)/2)`` of them), index the
    autocorrelation sums of all pairs, and look for a pair (A, B) whose sum cancels a pair (C, D).
    The first hit in enumeration order is returned, so the result is deterministic.
    """
    if n % 2 == 0 or n > 25:
        raise ValueError(f"williamson_rows searches small odd orders only, got {n}")
    half = (n - 1) // 2
    rows = []
    for bits in itertools.product((1, -1), repeat=half + 1):
        row = np.empty(n, dtype=np.int64)
        row[0] = bits[0]
        row[1 : half + 1] = bits[1:]
        row[half + 1 :] = row[1 : half + 1][::-1]
        rows.append(row)
    rows_arr = np.stack(rows)
    # periodic autocorrelation at shifts 1..half (the others mirror them)
    paf = np.stack([(rows_arr * np.roll(rows_arr, -s, axis=1)).sum(1) for s in range(1, half + 1)], 1)
    sums: dict[bytes, tuple[int, int]] = {}
    for i in range(len(rows)):
        for j in range(i, len(rows)):
            sums.setdefault((paf[i] + paf[j]).tobytes(), (i, j))
    for i in range(len(rows)):
        for j in range(i, len(rows)):
            hit = sums.get((-(paf[i] + paf[j])).tobytes())
            if hit is not None:
                a, b = hit
                return tuple(tuple(int(v) for v in rows_arr[k]) for k in (a, b, i, j))
    raise ValueError(f"no Williamson matrices of order {n} found")


def goethals_seidel_t3(n: int) -> np.ndarray:
    """Hadamard matrix of order 12n: T-matrices of order 3 combined with Williamson matrices of order n.

    T-matrices of order 3 are ``T1 = I, T2 = P, T3 = P^2, T4 = 0`` (P the cyclic shift): disjoint
    supports, ``T1 + T2 + T3`` all ones, ``sum T_i T_i^T = 3 I``. With Williamson ``A..D`` the four
    matrices ``X_i = sum_j T_j (x) e_ij M_ij`` (quaternion-like signs e, M a Latin square of A..D)
    are +-1, group-developed over Z_3 x Z_13 and satisfy ``sum X_i X_i^T = 12n I``; the
    Goethals-Seidel array (with R the index reversal) turns them into a Hadamard matrix.
    """
    A, B, C, D = (_circulant(np.array(r)) for r in williamson_rows(n))
    P = np.roll(np.eye(3, dtype=np.int64), 1, axis=1)
    T = [np.eye(3, dtype=np.int64), P, P @ P]
    X1 = np.kron(T[0], A) + np.kron(T[1], B) + np.kron(T[2], C)
    X2 = -np.kron(T[0], B) + np.kron(T[1], A) - np.kron(T[2], D)
    X3 = -np.kron(T[0], C) + np.kron(T[1], D) + np.kron(T[2], A)
    X4 = -np.kron(T[0], D) - np.kron(T[1], C) + np.kron(T[2], B)
    R = np.eye(3 * n, dtype=np.int64)[::-1]
    return np.block(
        [
            [X1, X2 @ R, X3 @ R, X4 @ R],
            [-X2 @ R, X1, X4.T @ R, -X3.T @ R],
            [-X3 @ R, -X4.T @ R, X1, X2.T @ R],
            [-X4 @ R, X3.T @ R, -X2.T @ R, X1],
        ]
    ).astype(np.int8)


@functools.lru_cache(maxsize=None)
def hadamard_k(k: int) -> np.ndarray:
    """The +-1 Hadamard matrix of order ``k`` used for the non-Sylvester factor (read-only int8)."""
    if k == 1:
        h = np.ones((1, 1), dtype=np.int8)
    elif k in UNSUPPORTED_ORDERS:
        raise ValueError(UNSUPPORTED_ORDERS[k])
    elif (h := paley(k)) is not None:
        pass
    elif k == 40:
        h = sylvester(paley_1(19))
    elif k == 156:
        h = goethals_seidel_t3(13)
    else:
        raise ValueError(
            f"no Hadamard matrix of order {k} is built in (Paley I needs {k - 1} a prime = 3 mod 4, Paley II "
            f"needs {k // 2 - 1} a prime or odd prime square = 1 mod 4; 156 is the one other order built)"
        )
    h.setflags(write=False)
    return h


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def split_size(n: int) -> tuple[int, int]:
    """``n -> (m, p)``: ``p`` a power of two, ``m = 1`` (n a power of two) or ``4 * (odd part of n)``;
    raises ``ValueError`` when no order-``m`` matrix is built (the format's ``hadamard_factors``)."""
    if n <= 0:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    p = n & -n
    odd = n // p
    if odd == 1:
        return 1, n
    if p < 4:
        raise ValueError(f"no Hadamard transform of size {n}: sizes other than 1 and 2 are multiples of 4")
    m = 4 * odd
    try:
        hadamard_k(m)
    except ValueError as exc:
        raise ValueError(f"Hadamard size {n} = {m} * {p // 4}: {exc}") from None
    return m, p // 4


def is_supported_size(n: int) -> bool:
    try:
        split_size(n)
    except ValueError:
        return False
    return True


def sylvester_matrix(n: int, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """Natural-order Sylvester matrix ``S[i, j] = (-1)**popcount(i & j)`` of a power-of-two order."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester matrices have power-of-two orders, got {n}")
    idx = torch.arange(n)
    v = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(v)
    while bool(v.any()):
        parity ^= v & 1
        v = v >> 1
    return (1 - 2 * parity).to(dtype=dtype, device=device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device="cpu", normalized: bool = False) -> torch.Tensor:
    """The matrix ``H_n = H_m (x) S_p`` that :func:`hadamard_transform_torch` applies (``x @ H_n``)."""
    k, p = split_size(n)
    h = torch.kron(torch.from_numpy(hadamard_k(k).astype(np.float64)), sylvester_matrix(p))
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Torch transforms
# ---------------------------------------------------------------------------------------------

_SMALL = 128  # largest Sylvester block applied as one dense matmul


@functools.lru_cache(maxsize=64)
def _cached_sylvester(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return sylvester_matrix(n, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_hk(k: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.from_numpy(hadamard_k(k).astype(np.float64))
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
    return _cached_hk(k, not inverse, y.dtype, y.device) @ y


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
