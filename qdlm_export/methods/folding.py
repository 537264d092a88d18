"""Folding offline transforms into weights: the one implementation AWQ, SmoothQuant, DuQuant and
QuaRot share.

A group of linears reads one input ``x`` (``families.LinearGroup``). A per-channel scale ``s`` is
folded by dividing the op that produces ``x`` -- the norm's gain (and bias), or the previous
linear's output rows (and bias) -- and multiplying the group's weight columns: ``(x / s)(W s)^T =
x W^T``. An orthogonal ``Q`` is folded the same way: readers hold ``W Q``, writers ``Q^T W``.

Arithmetic runs in float64 and is rounded once to each tensor's dtype (for float32 tensors that is
exactly float32 arithmetic). A norm kept in a low-precision dtype cannot hold ``gain / s`` exactly,
so :func:`divide_norm` returns the scale actually realised, which the readers must be multiplied by.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.transforms import hadamard_transform
from ..families import LinearGroup


def _linear(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, expected nn.Linear")
    return module


def norm_can_take(norm: nn.Module, size: int) -> bool:
    """Whether ``norm`` has an affine gain of ``size`` entries a per-channel scale can be folded into."""
    weight = getattr(norm, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (size,)


def feeder_problem(block: nn.Module, group: LinearGroup) -> str | None:
    """Why the op feeding ``group`` cannot take a per-channel scale, or None when it can: a norm
    without a gain of the input size, or a previous linear whose outputs are not the group's inputs
    one to one (``v -> o`` under grouped-query attention)."""
    in_features = _linear(block, group.linears[0]).in_features
    if group.norm is not None:
        if not norm_can_take(block.get_submodule(group.norm), in_features):
            return f"{group.norm} cannot take a scale: it has no weight of size {in_features}"
        return None
    if group.prev_linear is not None:
        prev = _linear(block, group.prev_linear)
        if prev.out_features != in_features:
            return f"{group.prev_linear} output size {prev.out_features} != {in_features}"
        return None
    return "no norm or previous linear feeds this group"


@torch.no_grad()
def divide_norm(norm: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """Divide the norm's gain (and bias) by ``s``; returns the scale realised after rounding to the
    norm's dtype (``s`` itself for a float32 or float64 norm)."""
    weight = norm.weight
    old = weight.data.float()
    weight.data.copy_((weight.data.double() / s.double()).to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data.copy_((bias.data.double() / s.double()).to(bias.dtype))
    if weight.dtype in (torch.float32, torch.float64):  # holds gain / s as computed
        return s
    new = weight.data.float()
    ok = (old != 0) & (new != 0)
    return torch.where(ok, old / torch.where(ok, new, torch.ones_like(new)), s)


def _update(linear: nn.Linear, master: torch.Tensor | None, fn) -> None:
    """Apply ``fn`` (float64 in, float64 out) to ``master`` when the caller keeps a float32 master
    copy of the weight (and refresh the weight from it), else to the weight itself."""
    if master is not None:
        master.copy_(fn(master.double()).to(master.dtype))
        linear.weight.data.copy_(master.to(linear.weight.dtype))
    else:
        linear.weight.data.copy_(fn(linear.weight.data.double()).to(linear.weight.dtype))


@torch.no_grad()
def divide_rows(linear: nn.Linear, s: torch.Tensor, master: torch.Tensor | None = None,
                rows: slice | None = None) -> None:
    """Divide a previous linear's output rows (and bias) by ``s``; ``rows``: only those rows (the v
    part of a fused q/k/v linear), the others unchanged."""
    s64 = s.double().to(linear.weight.device)
    if rows is not None:
        full = torch.ones(linear.weight.shape[0], dtype=torch.float64, device=s64.device)
        full[rows] = s64
        s64 = full
    _update(linear, master, lambda w: w / s64[:, None])
    if linear.bias is not None:
        linear.bias.data.copy_((linear.bias.data.double() / s64).to(linear.bias.dtype))


@torch.no_grad()
def multiply_columns(linear: nn.Linear, s: torch.Tensor, master: torch.Tensor | None = None) -> None:
    """Multiply a reader's input columns by ``s`` (the inverse of what the feeder was divided by)."""
    s64 = s.double().to(linear.weight.device)
    _update(linear, master, lambda w: w * s64)


@torch.no_grad()
def fold_scale(block: nn.Module, group: LinearGroup, s: torch.Tensor,
               masters: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Fold ``1/s`` into the op feeding ``group`` and ``s`` into its linears; returns the realised
    scale, or None (nothing changed) when the feeder cannot take it (see :func:`feeder_problem`).
    ``masters``: float32 master weights the caller quantizes from, kept in step with the block."""
    if feeder_problem(block, group) is not None:
        return None
    masters = masters or {}
    s = s.to(_linear(block, group.linears[0]).weight.device)
    if group.norm is not None:
        s = divide_norm(block.get_submodule(group.norm), s)
    else:
        assert group.prev_linear is not None
        divide_rows(_linear(block, group.prev_linear), s, masters.get(group.prev_linear))
    for name in group.linears:
        multiply_columns(_linear(block, name), s, masters.get(name))
    return s


@torch.no_grad()
def fold_scale_into_readers(norm: nn.Module, readers: list[nn.Module], s: torch.Tensor) -> torch.Tensor:
    """Fold ``1/s`` into a norm read by several modules (every expert and the router of a
    mixture-of-experts layer) and ``s`` into every reader's ``weight`` columns, so each computes
    what it did; returns the realised scale. The caller checks the norm can take it
    (:func:`norm_can_take`)."""
    s = divide_norm(norm, s.to(norm.weight.device))
    for reader in readers:
        multiply_columns(reader, s)
    return s


@torch.no_grad()
def fold_scale_into_rows(prev: nn.Linear, rows: slice, readers: list[nn.Linear], s: torch.Tensor) -> torch.Tensor:
    """Fold ``1/s`` into ``rows`` of ``prev`` (a fused q/k/v linear's value rows) and ``s`` into the
    readers' columns."""
    divide_rows(prev, s, rows=rows)
    for reader in readers:
        multiply_columns(reader, s)
    return s


def is_scale_only_norm(norm: nn.Module) -> bool:
    """A norm whose affine part is a gain without bias (RMSNorm): its gain folds into its readers."""
    return isinstance(getattr(norm, "weight", None), torch.Tensor) and getattr(norm, "bias", None) is None


@torch.no_grad()
def fold_norm_gain(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """Move a bias-free norm's gain into the columns of the linears reading it; the gain becomes 1."""
    if not is_scale_only_norm(norm):
        raise ValueError("only a bias-free scaled norm can fold its gain into its readers")
    for linear in readers:
        multiply_columns(linear, norm.weight.data)
    norm.weight.data = torch.ones_like(norm.weight.data)


def rotate_columns(weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``W Q`` for ``Q = diag(signs) H``: what a reader of a rotated input must hold."""
    w = weight.detach().double() * signs.to(weight.device)
    return hadamard_transform(w).to(weight.dtype)


@torch.no_grad()
def rotate_outputs(linear: nn.Linear, signs: torch.Tensor) -> None:
    """``Q^T W`` and ``b Q``: a writer of a rotated stream writes rotated vectors."""
    linear.weight.data = rotate_columns(linear.weight.data.t(), signs).t().contiguous()
    if linear.bias is not None:
        linear.bias.data = rotate_columns(linear.bias.data[None], signs)[0]


@torch.no_grad()
def rotate_value_rows(linear: nn.Linear, head_dim: int, rows: slice | None = None) -> None:
    """``H(head_dim)`` on every value head's output rows (and bias): all rows of a value projection,
    or ``rows`` of a fused q/k/v linear (q and k are left alone: their RoPE and q/k norms are not
    invariant under a rotation)."""
    rows = slice(None) if rows is None else rows
    w = linear.weight.data
    w[rows] = hadamard_per_head(w[rows].t(), head_dim).t()
    if linear.bias is not None:
        linear.bias.data[rows] = hadamard_per_head(linear.bias.data[rows][None], head_dim)[0]


def hadamard_per_head(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``W`` with ``H(head_dim)`` applied to every run of ``head_dim`` columns."""
    w = weight.detach().double()
    return hadamard_transform(w.reshape(*w.shape[:-1], -1, head_dim)).reshape(w.shape).to(weight.dtype)
