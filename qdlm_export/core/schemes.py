"""Integer quantization of weight matrices: the arithmetic every method shares.

A weight ``W [out, in]`` is split along ``in`` into groups of ``group_size`` columns (``-1``: one
group spanning the row, i.e. per output channel). Each (row, group) has a scale ``s`` and an integer
zero point ``z``; codes are unsigned, ``q in [0, 2**bits - 1]``, and

    W_hat = (q - z) * s

Symmetric schemes fix ``z = 2**(bits-1)`` (not stored); asymmetric ones store ``z`` per group.
Methods (RTN, GPTQ, AWQ...) decide *which* scales and codes; this module only defines how codes
follow from scales, so every method ends in the same :class:`QuantizedWeight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .packing import SUPPORTED_BITS


@dataclass(frozen=True)
class WeightScheme:
    """How one linear's weight is quantized."""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = True

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def symmetric_zero(self) -> int:
        return 1 << (self.bits - 1)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: unpacked codes, per-group scales and (asymmetric) zeros."""

    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # [out, groups], storage dtype
    zero_point: torch.Tensor | None  # uint8 [out, groups]; None when symmetric
    scheme: WeightScheme
    bias: torch.Tensor | None = None
    # Online transforms the loader applies to this linear's input before the matmul, in order, as
    # data (docs/FORMAT.md "Transforms"), and the tensors they reference, by suffix.
    input_transforms: list[dict] = field(default_factory=list)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.scheme, dtype)


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    out, inp = w.shape
    return w.reshape(out, inp // group, group)


def compute_qparams(
    w: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype = torch.float32,
    clip_ratio: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zero points per (row, group) for ``w [out, in]``.

    Returns ``(scale [out, groups] in scale_dtype, zero [out, groups] float)``. The range always
    contains 0 so that exact zeros stay exact. ``clip_ratio`` (scalar or ``[out, groups]``) shrinks
    the range, as the clip searches of GPTQ (MSE) and AWQ do. The scale is rounded to ``scale_dtype``
    *before* codes are computed, so codes are optimal for the scale actually stored.
    """
    group = scheme.effective_group_size(w.shape[1])
    g = _grouped(w.float(), group)
    w_min = g.amin(dim=-1).clamp(max=0) * clip_ratio
    w_max = g.amax(dim=-1).clamp(min=0) * clip_ratio
    if scheme.symmetric:
        absmax = torch.maximum(w_min.abs(), w_max)
        scale = absmax / (scheme.max_code / 2)
        zero = torch.full_like(scale, float(scheme.symmetric_zero))
    else:
        scale = (w_max - w_min) / scheme.max_code
        zero = None
    # An all-zero group gets scale 1 so that it quantizes to its zero point without dividing by 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    if zero is None:
        zero = torch.clamp(torch.round(-w_min / scale.float()), 0, scheme.max_code)
    return scale, zero


def quantize_with_qparams(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: WeightScheme
) -> torch.Tensor:
    """Round ``w`` to the nearest code given per-group ``scale`` and ``zero``; returns uint8 codes."""
    group = scheme.effective_group_size(w.shape[1])
    g = _grouped(w.float(), group)
    q = torch.round(g / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp_(0, scheme.max_code).reshape(w.shape).to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    scheme: WeightScheme,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - z) * s`` back to a dense ``[out, in]`` matrix in ``dtype`` (computed in float32)."""
    out, inp = codes.shape
    group = scheme.effective_group_size(inp)
    zero = (
        zero_point.float()
        if zero_point is not None
        else torch.full(scale.shape, float(scheme.symmetric_zero), device=codes.device)
    )
    g = codes.float().reshape(out, inp // group, group)
    w = (g - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(out, inp).to(dtype)


def quantize_rtn(
    w: torch.Tensor,
    scheme: WeightScheme,
    scale_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest: min/max qparams per group, then nearest code. The baseline of every study."""
    scale, zero = compute_qparams(w, scheme, scale_dtype)
    codes = quantize_with_qparams(w, scale, zero, scheme)
    zero_point = None if scheme.symmetric else zero.to(torch.uint8)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero_point, scheme=scheme, bias=bias)
