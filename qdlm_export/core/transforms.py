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
``x`` to ``x @ T``. The Hadamard matrices are deterministic functions of their size, built in
``hadamard.py`` (and defined in FORMAT.md), so checkpoints store no Hadamard tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .hadamard import (  # noqa: F401 (re-exported: the format's Hadamard matrices)
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform_reference,
    hadamard_unsupported_reason,
    has_hadamard,
)

TRANSFORM_OPS = ("smooth", "hadamard", "block_rotation", "permute")
QUANTIZE_OPS = ("quantize_input", "quantize_output")

SMOOTH_TENSOR = "input_smooth"


# ---- Hadamard matrices: built in hadamard.py (the format's one construction), applied here ----------

# What hadamard_transform runs. The format's torch reference unless the kernels are imported: core may
# not import kernels, so qdlm_export.kernels plugs its dispatch in (kernels/hadamard.py) at import.
_hadamard_backend: Callable[[torch.Tensor], torch.Tensor] = hadamard_transform_reference


def set_hadamard_backend(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Make :func:`hadamard_transform` run ``fn(x)`` (the normalised ``x @ H_n``); None: the reference."""
    global _hadamard_backend
    _hadamard_backend = fn or hadamard_transform_reference


def hadamard_transform(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` along the last dim (``n`` = its size).

    :func:`hadamard_transform_reference`, unless :mod:`qdlm_export.kernels` is imported (the loader
    imports it): then the kernel dispatch runs it on a GPU, or when ``QDLM_KERNEL_BACKEND`` forces a
    backend (fast-hadamard-transform, Triton or torch, on the same matrices).
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"last dimension {x.shape[-1]} is not the Hadamard size {n}")
    return _hadamard_backend(x)


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
            reason = hadamard_unsupported_reason(size)
            if reason is not None:
                raise ValueError(f"no Hadamard matrix of size {size} is defined by this format version: {reason}")
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
