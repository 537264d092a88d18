"""Which implementation runs each kernel op: backends registered by the op modules, chosen per call.

An op module (``weight_only.py``, ``int8.py``, ``hadamard.py``) registers each of its backends with
an ``unsupported`` predicate (None when it can run a problem, else the reason), an ``auto``
predicate (may ``auto`` pick it?) and a priority. Choosing, for one call:

* the ``backend=`` argument of the op, else the setting ``QDLM_KERNEL_BACKEND`` (``auto`` | ``torch``
  | ``triton``; default ``auto``), read once per process by :func:`configured_backend` (tests that
  change the variable call :func:`refresh_backend_setting`);
* ``auto`` first tries the backend an op's *preference* names for the problem (one measured fastest
  there: ``kernels/tuned.py``), when it can run; else it takes the first backend, by priority, that
  can run and that ``auto`` may pick (it never
  picks the Triton *interpreter*: with ``TRITON_INTERPRET=1`` Triton runs on CPU tensors, as the
  tests run it, but only when asked for by name);
* ``torch`` / ``triton`` force that family, and ``backend=`` also takes one backend's own name
  (``"torch._int_mm"``); a forced choice that cannot run raises :class:`KernelBackendError` with
  the reasons.

Choices are cached per problem (op, device, shape facts, request, interpreter flag).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import QdlmError

ENV_VAR = "QDLM_KERNEL_BACKEND"
FAMILIES = ("auto", "torch", "triton")


class KernelBackendError(QdlmError):
    """A forced kernel backend cannot run this problem, or the backend name is unknown."""

    exit_code = 2


@functools.cache
def configured_backend() -> str:
    """The process's backend setting, ``QDLM_KERNEL_BACKEND`` (``auto`` when unset), read once."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in FAMILIES:  # raised on every use (errors are not cached): the setting stays wrong
        raise KernelBackendError(
            f"{ENV_VAR}={value!r} is not a kernel backend", hint=f"use one of {', '.join(FAMILIES)} (or unset it)"
        )
    return value


def refresh_backend_setting() -> None:
    """Read ``QDLM_KERNEL_BACKEND`` again at the next call (for code, mostly tests, that changes it)."""
    configured_backend.cache_clear()
    forget_selections()


def forget_selections() -> None:
    """Choose every backend afresh at the next call (after a backend's availability changed)."""
    _SELECTIONS.clear()


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
    family: str  # what QDLM_KERNEL_BACKEND names: "torch", "triton" (or the backend's own name)
    summary: str
    impl: Callable[..., Any]
    unsupported: Callable[[Problem], str | None]  # None: can run; else the reason it cannot
    auto: Callable[[Problem], bool]  # may `auto` pick it (given it can run)?
    priority: int


_REGISTRY: dict[str, list[Backend]] = {}
_STEPS: dict[str, tuple[str, str, int]] = {}  # composite op -> (quantize op, GEMM op, default act bits)
_PREFERENCES: dict[str, Callable[[Problem], str | None]] = {}  # op -> the backend measured fastest, or None


def register_backend(
    op: str,
    name: str,
    impl: Callable[..., Any],
    *,
    family: str,
    summary: str,
    priority: int,
    unsupported: Callable[[Problem], str | None] | None = None,
    auto: Callable[[Problem], bool] | None = None,
) -> None:
    """Register ``impl`` as backend ``name`` of ``op`` (replacing one of the same name)."""
    backends = [b for b in _REGISTRY.get(op, []) if b.name != name]
    backends.append(
        Backend(op, name, family, summary, impl, unsupported or (lambda p: None), auto or (lambda p: True), priority)
    )
    _REGISTRY[op] = sorted(backends, key=lambda b: -b.priority)
    _SELECTIONS.clear()


def register_preference(op: str, preferred: Callable[[Problem], str | None]) -> None:
    """``preferred(problem)`` names the backend ``auto`` tries first for ``op`` (measured fastest for
    such a problem on this device), or None; one that cannot run the problem is passed over."""
    _PREFERENCES[op] = preferred
    _SELECTIONS.clear()


def register_steps(op: str, quantize_op: str, gemm_op: str, act_bits: int) -> None:
    """Declare ``op`` as quantize-then-GEMM, so :func:`describe_backend` reports its two steps."""
    _STEPS[op] = (quantize_op, gemm_op, act_bits)


def on_cuda(p: Problem) -> bool:
    """An ``auto`` predicate: GPU backends are picked automatically on CUDA tensors only."""
    return p.device.type == "cuda"


def backends_for(op: str) -> list[Backend]:
    """``op``'s backends, highest priority first."""
    if op not in _REGISTRY:
        raise KernelBackendError(f"unknown kernel op {op!r}; ops: {sorted(_REGISTRY)}")
    return list(_REGISTRY[op])


def backend_table() -> dict[str, list[dict[str, Any]]]:
    """Every op's backends in priority order (for docs and ``inspect``)."""
    return {
        op: [{"name": b.name, "family": b.family, "summary": b.summary, "priority": b.priority} for b in bs]
        for op, bs in sorted(_REGISTRY.items())
    }


def requested_backend(backend: str | None = None) -> str:
    """The request in force: the argument, else the process's setting."""
    return configured_backend() if backend is None else backend


def _join(notes: list[str] | tuple[str, ...]) -> str:
    """'a: why; b: why' with backends that share a reason listed once ('a, b: why')."""
    by_reason: dict[str, list[str]] = {}
    for note in notes:
        name, _, reason = note.partition(": ")
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())


def _select(problem: Problem, request: str, forced_by: str) -> tuple[Backend, tuple[str, ...]]:
    """(backend, notes): notes say why higher-priority backends were passed over."""
    backends = backends_for(problem.op)
    notes: list[str] = []
    if request == "auto":
        preferred = _PREFERENCES.get(problem.op)
        name = preferred(problem) if preferred else None
        chosen = next((b for b in backends if b.name == name and b.unsupported(problem) is None), None)
        if chosen is not None:
            above = [b.name for b in backends[: backends.index(chosen)]]
            return chosen, tuple(f"{n}: {chosen.name} was measured faster here (kernels/tuned)" for n in above)
        for b in backends:
            reason = b.unsupported(problem)
            if reason is None and b.auto(problem):
                return b, tuple(notes)
            notes.append(f"{b.name}: {reason or 'not chosen automatically here'}")
        raise KernelBackendError(f"no backend can run {problem.op} here: {_join(notes)}")
    names = {b.name for b in backends}
    if request not in FAMILIES and request not in names:
        raise KernelBackendError(
            f"unknown backend {request!r} for {problem.op}",
            hint=f"choose one of {', '.join(FAMILIES[1:])} or {', '.join(sorted(names))}",
        )
    for b in backends:
        if b.family == request or b.name == request:
            reason = b.unsupported(problem)
            if reason is None:
                return b, tuple(notes)
            notes.append(f"{b.name}: {reason}")
    raise KernelBackendError(
        f"{forced_by} cannot run {problem.op} on {problem.device}: {_join(notes) or 'no such backend'}",
        hint=f"use {ENV_VAR}=auto (or torch) to fall back",
    )


_SELECTIONS: dict[tuple, tuple[Backend, tuple[str, ...]]] = {}
_CACHE_LIMIT = 4096
_ALIASES = {"in_features": "K", "out_features": "N", "k": "K", "n_out": "N", "m": "M"}


def _choose(op: str, device: torch.device | str, backend: str | None, params: dict[str, Any]):
    # Looked up on every forward of every layer: the key is what the caller passed (``backend`` None
    # stands for the process's setting, which refresh_backend_setting() forgets with the choices).
    key = (op, device, backend, os.environ.get("TRITON_INTERPRET"), *params.items())
    hit = _SELECTIONS.get(key)
    if hit is None:
        request = requested_backend(backend)
        forced_by = f"{ENV_VAR}={request}" if backend is None else f"backend={request!r}"
        if len(_SELECTIONS) >= _CACHE_LIMIT:
            _SELECTIONS.clear()
        hit = _SELECTIONS[key] = _select(Problem(op, torch.device(device), dict(params)), request, forced_by)
    return hit


def choose(op: str, device: torch.device | str, backend: str | None = None, **params: Any) -> Backend:
    """The backend that runs ``op`` here (what the public ops call on every forward; cached)."""
    return _choose(op, device, backend, params)[0]


def select_backend(op: str, device: torch.device | str, backend: str | None = None, **params: Any) -> Backend:
    """The backend that would run ``op`` for this device and these shape facts (keys as in
    :func:`describe_backend`); raises :class:`KernelBackendError` when none can."""
    return _choose(op, device, backend, {_ALIASES.get(k, k): v for k, v in params.items()})[0]


def describe_backend(op: str, device: torch.device | str, backend: str | None = None, **shapes: Any) -> str:
    """One line saying which backend runs ``op`` on ``device`` for these shapes, and why.

    ``shapes`` are the facts of one layer, e.g. for ``weight_only_linear``: ``in_features`` (or
    ``K``), ``out_features`` (``N``), ``bits``, ``group_size``, ``symmetric``, ``dtype`` and
    optionally ``M`` (tokens); for ``hadamard``: ``n``. Quantize-then-GEMM ops (``w8a8_linear``,
    ``w4a4_linear``) describe their two steps; ``act_bits`` and ``act_dtype`` (the rows the quantizer
    reads, when not ``dtype``) are the first step's. A forced backend that cannot run is reported, not raised.
    """
    if op in _STEPS:
        quantize_op, gemm_op, default_bits = _STEPS[op]
        act_bits = shapes.pop("act_bits", default_bits)
        act_dtype = shapes.pop("act_dtype", None)
        first_shapes = {k: shapes[k] for k in ("M", "K", "in_features", "dtype") if k in shapes}
        if act_dtype is not None:
            first_shapes["dtype"] = act_dtype
        first = describe_backend(quantize_op, device, backend, bits=act_bits, **first_shapes)
        return f"{first}; then {describe_backend(gemm_op, device, backend, **shapes)}"
    try:
        chosen, notes = _choose(op, device, backend, {_ALIASES.get(k, k): v for k, v in shapes.items()})
    except KernelBackendError as exc:
        return f"unavailable ({exc.message})"
    text = f"{chosen.name} ({chosen.summary})"
    return f"{text}; skipped {_join(notes)}" if notes else text
