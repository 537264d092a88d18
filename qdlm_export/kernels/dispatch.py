"""Which implementation runs each kernel op: a registry of backends with availability predicates.

Ops and their backends (highest priority first; ``auto`` takes the first one that can run)::

    weight_only_linear  triton (CUDA)                  > cpu_packed (CPU, bf16/fp16 activations)
                                                       > torch (dequantize + matmul)
    quantize_per_token  triton (CUDA)                  > torch
    int8_gemm           torch._int_mm (where it applies natively) > triton (CUDA) > torch (padded/float64)
    packed_int_linear   triton (CUDA)                  > torch
    hadamard            fast_hadamard_transform (CUDA) > triton (CUDA) > torch

Choosing: the ``backend=`` argument of each op, else the environment variable
``QDLM_KERNEL_BACKEND`` (``auto`` | ``torch`` | ``triton``; default ``auto``). ``torch`` and ``triton``
force that family and raise :class:`KernelBackendError` (with the reason) if it cannot run the
problem; ``backend=`` also accepts one backend's own name (``"torch._int_mm"``,
``"fast_hadamard_transform"``). ``auto`` never picks the Triton *interpreter*: with
``TRITON_INTERPRET=1`` Triton can run on CPU tensors (that is how the tests run it), but only when
asked for by name.

:func:`describe_backend` says what would run for one layer without running it (``inspect`` shows it).
Selections are cached per problem (shape, dtype, device, request, interpreter flag).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import QdlmError
from . import cpu_packed as _cpu
from . import hadamard as _had
from . import int8 as _int8
from . import weight_only as _wo
from ._triton import fast_hadamard_transform_available, triton_unavailable_reason

ENV_VAR = "QDLM_KERNEL_BACKEND"
FAMILIES = ("auto", "torch", "triton")


class KernelBackendError(QdlmError):
    """A forced kernel backend cannot run this problem, or the backend name is unknown."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """What a predicate sees: the device and the shape facts of one call (``M`` may be unknown)."""

    op: str
    device: torch.device
    params: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # p.bits, p.group_size ... (None when not given)
        params = object.__getattribute__(self, "params")
        if name in params:
            return params[name]
        if name.startswith("__"):
            raise AttributeError(name)
        return None


@dataclass(frozen=True)
class Backend:
    op: str
    name: str  # unique within the op
    family: str  # "torch", "triton" or "fast_hadamard_transform": what QDLM_KERNEL_BACKEND names
    summary: str
    impl: Callable[..., Any]
    unsupported: Callable[[Problem], str | None]  # None: can run; else the reason it cannot
    auto: Callable[[Problem], bool]  # may `auto` pick it (given it can run)?
    priority: int


_REGISTRY: dict[str, list[Backend]] = {}


def register_backend(
    op: str,
    name: str,
    *,
    family: str,
    summary: str,
    priority: int,
    unsupported: Callable[[Problem], str | None] | None = None,
    auto: Callable[[Problem], bool] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as backend ``name`` of ``op``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        backends = [b for b in _REGISTRY.get(op, []) if b.name != name]
        backends.append(
            Backend(
                op=op,
                name=name,
                family=family,
                summary=summary,
                impl=fn,
                unsupported=unsupported or (lambda p: None),
                auto=auto or (lambda p: True),
                priority=priority,
            )
        )
        _REGISTRY[op] = sorted(backends, key=lambda b: -b.priority)
        _SELECTION_CACHE.clear()
        return fn

    return deco


def backends_for(op: str) -> list[Backend]:
    if op not in _REGISTRY:
        raise KernelBackendError(f"unknown kernel op {op!r}; ops: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def requested_backend(backend: str | None = None) -> str:
    """The request in force: the argument, else ``QDLM_KERNEL_BACKEND``, else ``auto``."""
    if backend is not None:
        return backend
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in FAMILIES:
        raise KernelBackendError(
            f"{ENV_VAR}={value!r} is not a kernel backend",
            hint=f"use one of {', '.join(FAMILIES)} (or unset it)",
        )
    return value


_SELECTION_CACHE: dict[tuple, tuple[Backend, tuple[str, ...]]] = {}
_CACHE_LIMIT = 4096


def _select(problem: Problem, request: str) -> tuple[Backend, tuple[str, ...]]:
    """(backend, notes): notes say why higher-priority backends were passed over."""
    backends = backends_for(problem.op)
    names = {b.name for b in backends}
    notes: list[str] = []
    if request == "auto":
        for b in backends:
            reason = b.unsupported(problem)
            if reason is None and b.auto(problem):
                return b, tuple(notes)
            notes.append(f"{b.name}: {reason or 'not chosen automatically here'}")
        raise KernelBackendError(f"no backend can run {problem.op} here: {_join(notes)}")
    if request not in FAMILIES and request not in names:
        raise KernelBackendError(
            f"unknown backend {request!r} for {problem.op}",
            hint=f"choose one of {', '.join(FAMILIES[1:])} or {', '.join(sorted(names))}",
        )
    chosen = [b for b in backends if b.family == request or b.name == request]
    for b in chosen:
        reason = b.unsupported(problem)
        if reason is None:
            return b, tuple(notes)
        notes.append(f"{b.name}: {reason}")
    forced_by = (
        f"{ENV_VAR}={request}" if os.environ.get(ENV_VAR, "").strip().lower() == request else f"backend={request!r}"
    )
    raise KernelBackendError(
        f"{forced_by} cannot run {problem.op} on {problem.device}: {_join(notes) or 'no such backend'}",
        hint=f"use {ENV_VAR}=auto (or torch) to fall back",
    )


def _join(notes: list[str] | tuple[str, ...]) -> str:
    """'a: why; b: why' with backends that share a reason listed once ('a, b: why')."""
    by_reason: dict[str, list[str]] = {}
    for note in notes:
        name, _, reason = note.partition(": ")
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())


def select_backend(op: str, device: torch.device | str, backend: str | None = None, **params: Any) -> Backend:
    """The backend that would run ``op`` for this device and these shape facts (keys as in
    :func:`describe_backend`); raises :class:`KernelBackendError` when none can."""
    params = {_ALIASES.get(k, k): v for k, v in params.items()}
    return _select_cached(op, torch.device(device), requested_backend(backend), params)[0]


def _select_cached(
    op: str, device: torch.device, request: str, params: dict[str, Any]
) -> tuple[Backend, tuple[str, ...]]:
    key = (op, device, request, os.environ.get("TRITON_INTERPRET"), *params.items())
    hit = _SELECTION_CACHE.get(key)
    if hit is None:
        if len(_SELECTION_CACHE) >= _CACHE_LIMIT:
            _SELECTION_CACHE.clear()
        hit = _SELECTION_CACHE[key] = _select(Problem(op, device, dict(params)), request)
    return hit


_ALIASES = {"in_features": "K", "out_features": "N", "k": "K", "n_out": "N", "m": "M"}


def describe_backend(op: str, device: torch.device | str, backend: str | None = None, **shapes: Any) -> str:
    """One line saying which backend runs ``op`` on ``device`` for these shapes, and why.

    ``shapes`` are the facts of one layer, e.g. for ``weight_only_linear``: ``in_features`` (or
    ``K``), ``out_features`` (``N``), ``bits``, ``group_size``, ``symmetric``, ``dtype`` and
    optionally ``M`` (tokens); for ``hadamard``: ``n``. ``w8a8_linear`` and ``w4a4_linear`` describe
    their two steps. A forced backend that cannot run is reported, not raised.
    """
    if op in ("w8a8_linear", "w4a4_linear"):
        act_bits = shapes.pop("act_bits", 8 if op == "w8a8_linear" else 4)
        first = describe_backend(
            "quantize_per_token", device, backend, bits=act_bits, **_pick(shapes, "M", "K", "in_features", "dtype")
        )
        gemm = "int8_gemm" if op == "w8a8_linear" else "packed_int_linear"
        return f"{first}; then {describe_backend(gemm, device, backend, **shapes)}"
    params = {_ALIASES.get(k, k): v for k, v in shapes.items()}
    try:
        chosen, notes = _select_cached(op, torch.device(device), requested_backend(backend), params)
    except KernelBackendError as exc:
        return f"unavailable ({exc.message})"
    text = f"{chosen.name} ({chosen.summary})"
    return f"{text}; skipped {_join(notes)}" if notes else text


def _pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: d[k] for k in keys if k in d}


def backend_table() -> dict[str, list[dict[str, Any]]]:
    """Every op's backends in priority order (for docs and ``inspect``)."""
    return {
        op: [{"name": b.name, "family": b.family, "summary": b.summary, "priority": b.priority} for b in bs]
        for op, bs in sorted(_REGISTRY.items())
    }


# ---------------------------------------------------------------------------------------------
# Predicates
# ---------------------------------------------------------------------------------------------


def _triton_reason(p: Problem, shape_reason: Callable[..., str | None]) -> str | None:
    return triton_unavailable_reason(p.device) or shape_reason(**p.params)


def _on_cuda(p: Problem) -> bool:
    return p.device.type == "cuda"


def _wo_triton(p: Problem) -> str | None:
    return _triton_reason(
        p,
        lambda **k: _wo.triton_unsupported_reason(
            bits=k.get("bits"), group_size=k.get("group_size"), in_features=k.get("K"), dtype=k.get("dtype")
        ),
    )


def _packed_triton(p: Problem) -> str | None:
    return _triton_reason(
        p,
        lambda **k: _int8.triton_packed_unsupported_reason(
            bits=k.get("bits"),
            group_size=k.get("group_size"),
            in_features=k.get("K"),
            symmetric=k.get("symmetric", True) is not False,
        ),
    )


def _quant_triton(p: Problem) -> str | None:
    return _triton_reason(
        p, lambda **k: None if k.get("bits", 8) in _int8.INT_ACT_BITS else f"{k.get('bits')}-bit activations"
    )


def _int_mm_native(p: Problem) -> str | None:
    if p.device.type == "cpu":
        return None
    if p.device.type != "cuda":
        return f"torch._int_mm does not run on {p.device.type}"
    K, N, M = p.K, p.N, p.M
    if (K is not None and K % 8) or (N is not None and N % 8):
        return "torch._int_mm on CUDA needs K and N multiples of 8"
    if M is not None and M <= 16:
        return "torch._int_mm on CUDA needs more than 16 rows"
    return None


def _had_pow2(p: Problem) -> int | None:
    try:
        return _had.split_size(p.n)[1] if p.n is not None else None
    except ValueError:
        return None


def _had_torch(p: Problem) -> str | None:
    if p.n is None:
        return None
    try:
        _had.split_size(p.n)
    except ValueError as exc:
        return str(exc)
    return None


def _had_triton(p: Problem) -> str | None:
    pow2 = _had_pow2(p)
    if p.n is not None and pow2 is None:
        return _had_torch(p)
    return _triton_reason(
        p, lambda **k: None if pow2 is None else _had.triton_fwht_unsupported_reason(n=pow2, dtype=k.get("dtype"))
    )


def _had_fht(p: Problem) -> str | None:
    if not fast_hadamard_transform_available():
        return "fast_hadamard_transform is not installed (pip install 'qdlm-export[cuda]')"
    if p.device.type != "cuda":
        return "fast_hadamard_transform needs CUDA tensors"
    pow2 = _had_pow2(p)
    if p.n is not None and pow2 is None:
        return _had_torch(p)
    return None if pow2 is None else _had.fht_unsupported_reason(n=pow2, dtype=p.dtype)


# ---------------------------------------------------------------------------------------------
# Backends (Triton modules are imported on first use: see _triton.py for why)
# ---------------------------------------------------------------------------------------------


@register_backend(
    "weight_only_linear",
    "triton",
    family="triton",
    priority=20,
    unsupported=_wo_triton,
    auto=_on_cuda,
    summary="fused unpack + grouped dequant-GEMM",
)
def _wo_linear_triton(*args: Any, **kwargs: Any) -> torch.Tensor:
    from .weight_only_triton import weight_only_linear_triton

    return weight_only_linear_triton(*args, **kwargs)


register_backend("weight_only_linear", "torch", family="torch", priority=0, summary="dequantize + matmul")(
    _wo.weight_only_linear_torch
)


def _wo_cpu_packed(p: Problem) -> str | None:
    return _cpu.unsupported_reason(
        bits=p.bits,
        group_size=p.group_size,
        in_features=p.K,
        out_features=p.N,
        symmetric=p.symmetric,
        device=p.device,
    )


def _wo_cpu_packed_auto(p: Problem) -> bool:
    # bf16/fp16 models only: the kernels compute in bf16, float32 models keep the exact torch path.
    return p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)


register_backend(
    "weight_only_linear",
    "cpu_packed",
    family="cpu_packed",
    priority=10,
    unsupported=_wo_cpu_packed,
    auto=_wo_cpu_packed_auto,
    summary="torch's packed CPU int4/int8 kernels (few tokens) or bf16 dequantize + GEMM (many), repacked once",
)(_cpu.weight_only_linear_cpu)


@register_backend(
    "quantize_per_token",
    "triton",
    family="triton",
    priority=20,
    unsupported=_quant_triton,
    auto=_on_cuda,
    summary="fused per-token absmax + round",
)
def _quant_triton_impl(*args: Any, **kwargs: Any):
    from .int8_triton import quantize_per_token_triton

    return quantize_per_token_triton(*args, **kwargs)


register_backend("quantize_per_token", "torch", family="torch", priority=0, summary="per-token absmax + round")(
    _int8.quantize_per_token_torch
)

register_backend(
    "int8_gemm",
    "torch._int_mm",
    family="torch",
    priority=30,
    unsupported=_int_mm_native,
    summary="torch._int_mm, then scales",
)(_int8.int8_gemm_torch)


@register_backend(
    "int8_gemm",
    "triton",
    family="triton",
    priority=20,
    auto=_on_cuda,
    unsupported=lambda p: _triton_reason(p, lambda **k: None),
    summary="int8 MMA with fused scale epilogue",
)
def _int8_gemm_triton_impl(*args: Any, **kwargs: Any) -> torch.Tensor:
    from .int8_triton import int8_gemm_triton

    return int8_gemm_triton(*args, **kwargs)


register_backend(
    "int8_gemm", "torch", family="torch", priority=0, summary="torch._int_mm on padded rows, else exact float64 matmul"
)(_int8.int8_gemm_torch)


@register_backend(
    "packed_int_linear",
    "triton",
    family="triton",
    priority=20,
    unsupported=_packed_triton,
    auto=_on_cuda,
    summary="packed weight unpacked to int8 in-kernel + int8 MMA",
)
def _packed_triton_impl(*args: Any, **kwargs: Any) -> torch.Tensor:
    from .int8_triton import packed_int_linear_triton

    return packed_int_linear_triton(*args, **kwargs)


register_backend(
    "packed_int_linear",
    "torch",
    family="torch",
    priority=0,
    summary="torch._int_mm on unpacked int8 weights if per channel, else dequantize + matmul",
)(_int8.packed_int_linear_torch)


def _fwht_with(pow2_fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A full transform from a power-of-two one: ``pow2_fn`` on the 2**m axis, then H_m in torch."""

    def run(x: torch.Tensor, normalized: bool = True, inverse: bool = False) -> torch.Tensor:
        n = x.shape[-1]
        k, p = _had.split_size(n)  # S_p is symmetric: forward and inverse differ only in H_m
        scale = n**-0.5 if normalized else 1.0
        if k == 1:
            return pow2_fn(x, scale)
        y = pow2_fn(x.reshape(-1, k, p), scale)
        y = _had.apply_hadamard_k(y.to(_had.compute_dtype(x.dtype)), k, inverse)
        return y.reshape(x.shape).to(x.dtype)

    return run


def _fht_pow2(x: torch.Tensor, scale: float) -> torch.Tensor:
    import fast_hadamard_transform

    return fast_hadamard_transform.hadamard_transform(x, scale)


def _triton_pow2(x: torch.Tensor, scale: float) -> torch.Tensor:
    from .hadamard_triton import fwht_triton

    return fwht_triton(x, scale)


register_backend(
    "hadamard",
    "fast_hadamard_transform",
    family="fast_hadamard_transform",
    priority=30,
    unsupported=_had_fht,
    summary="fast_hadamard_transform CUDA kernel, then H_m",
)(_fwht_with(_fht_pow2))
register_backend(
    "hadamard",
    "triton",
    family="triton",
    priority=20,
    unsupported=_had_triton,
    auto=_on_cuda,
    summary="Triton FWHT as two Sylvester matmuls, then H_m",
)(_fwht_with(_triton_pow2))
register_backend(
    "hadamard",
    "torch",
    family="torch",
    priority=0,
    unsupported=_had_torch,
    summary="blocked Sylvester matmuls, then H_m",
)(_had.hadamard_transform_torch)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------


def weight_only_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W_hat.T + bias -> [..., out]`` in ``x.dtype``; ``W_hat`` from the packed weight
    (layout in ``formats/packing.py``, arithmetic in ``quantization.py``)."""
    b, _ = _select_cached(
        "weight_only_linear",
        x.device,
        requested_backend(backend),
        dict(
            M=x.numel() // max(in_features, 1),
            K=in_features,
            N=weight_packed.shape[0],
            bits=bits,
            group_size=group_size,
            symmetric=weight_zero_point is None,
            dtype=x.dtype,
        ),
    )
    return b.impl(x, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias)


def quantize_per_token(
    x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8 (or int4-in-int8) quantization: ``(x_q [..., K], x_scale [..., 1])``,
    bit-identical to ``activations.activation_codes`` (dynamic, symmetric); see ``int8.py``."""
    K = x.shape[-1]
    b, _ = _select_cached(
        "quantize_per_token",
        x.device,
        requested_backend(backend),
        dict(M=x.numel() // max(K, 1), K=K, bits=bits, dtype=x.dtype),
    )
    return b.impl(x, bits, clip_ratio)


def int8_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``(a_q @ b_q.T) * a_scale * b_scale.T + bias`` (int8 operands, exact int32 accumulation)."""
    K = a_q.shape[-1]
    b, _ = _select_cached(
        "int8_gemm",
        a_q.device,
        requested_backend(backend),
        dict(M=a_q.numel() // max(K, 1), K=K, N=b_q.shape[0], dtype=out_dtype),
    )
    return b.impl(a_q, a_scale, b_q, b_scale, bias, out_dtype)


def packed_int_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """int8 activations (per-token scales) times a packed quantized weight; see ``int8.py``."""
    b, _ = _select_cached(
        "packed_int_linear",
        x_q.device,
        requested_backend(backend),
        dict(
            M=x_q.numel() // max(in_features, 1),
            K=in_features,
            N=weight_packed.shape[0],
            bits=bits,
            group_size=group_size,
            symmetric=weight_zero_point is None,
            dtype=out_dtype,
        ),
    )
    return b.impl(
        x_q, x_scale, weight_packed, weight_scale, weight_zero_point, bits, group_size, in_features, bias, out_dtype
    )


def w8a8_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    clip_ratio: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """W8A8: quantize ``x`` per token to int8, then the int8 GEMM against ``weight_q`` (int8
    ``[out, in]``, per-channel ``weight_scale [out]``). Returns ``x.dtype``."""
    x_q, x_scale = quantize_per_token(x, 8, clip_ratio, backend=backend)
    return int8_gemm(x_q, x_scale, weight_q, weight_scale, bias, x.dtype, backend=backend)


def w4a4_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 4,
    act_bits: int = 4,
    clip_ratio: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """W4A4 (or WxA8 with ``act_bits=8``): per-token quantize ``x`` to ``act_bits`` held in int8, then
    multiply by the packed ``bits``-bit weight on int8 MMAs. Returns ``x.dtype``. (Rotate ``x`` with
    :func:`hadamard_transform` first if the weights were quantized in a rotated basis.)"""
    x_q, x_scale = quantize_per_token(x, act_bits, clip_ratio, backend=backend)
    return packed_int_linear(
        x_q,
        x_scale,
        weight_packed,
        weight_scale,
        weight_zero_point,
        bits,
        group_size,
        in_features,
        bias,
        x.dtype,
        backend=backend,
    )


def hadamard_transform(
    x: torch.Tensor, normalized: bool = True, inverse: bool = False, *, backend: str | None = None
) -> torch.Tensor:
    """Walsh-Hadamard transform over the last dim: ``x @ H_n`` (``x @ H_n.T`` when ``inverse``), scaled
    by 1/sqrt(n) when ``normalized``. ``H_n`` is the checkpoint format's matrix (``transforms.py``);
    sizes and constructions in ``hadamard.py``."""
    b, _ = _select_cached("hadamard", x.device, requested_backend(backend), dict(n=x.shape[-1], dtype=x.dtype))
    return b.impl(x, normalized, inverse)
