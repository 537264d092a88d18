"""Activation quantizers of weight-activation checkpoints (W8A8, W4A8, W4A4), as fake quantization.

A quantized linear's (transformed) input is rounded to ``bits``-bit integers and back before the
matmul, exactly as an integer GEMM would see it. Two granularities (the checkpoint's
``activations`` section, docs/FORMAT.md):

* ``token`` (dynamic): one scale (and zero point, if asymmetric) per token, computed at run time
  from that token's range, shrunk by ``clip_ratio``. Nothing is stored.
* ``tensor`` (static): one scale per linear (``NAME.input_scale`` float32 ``[1]``, plus
  ``NAME.input_zero_point`` uint8 ``[1]`` if asymmetric) calibrated from the inputs the linear saw
  while quantizing, shrunk by ``clip_ratio``.

Codes. Symmetric: ``q = clamp(round(x / s), -qmax, qmax)`` with ``qmax = 2^(bits-1) - 1`` and
``s = clip * max|x| / qmax``, so 4-bit codes are in ``[-7, 7]`` and both widths fit int8 (the
convention of ``kernels/int8.py``). Asymmetric: ``q = clamp(round(x / s) + z, 0, 2^bits - 1)`` with
``s = clip * (max(x, 0) - min(x, 0)) / (2^bits - 1)`` and ``z = round(-clip * min(x, 0) / s)``.
Rounding is half away from zero everywhere (bit-compatible with the int8 kernels). A token (or
tensor) that is all zeros gets scale 0 and dequantizes to zeros.

:func:`quantize_activation` is the single entry point the loader calls; it returns the dequantized
input. :func:`activation_codes` gives the integer codes and scales for a kernel that consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

INPUT_SCALE = "input_scale"
INPUT_ZERO_POINT = "input_zero_point"


@dataclass(frozen=True)
class ActivationSpec:
    bits: int = 8
    granularity: str = "token"  # "token" (dynamic) | "tensor" (static, calibrated)
    symmetric: bool = True
    clip_ratio: float = 1.0

    @classmethod
    def from_config(cls, activations: Mapping[str, Any], bits: int | None = None) -> "ActivationSpec":
        """From a checkpoint's ``activations`` section (``bits`` overrides, e.g. with ``qkv_bits``)."""
        return cls(
            bits=int(bits if bits is not None else activations["bits"]),
            granularity=str(activations.get("granularity", "token")),
            symmetric=bool(activations.get("symmetric", True)),
            clip_ratio=float(activations.get("clip_ratio", 1.0)),
        )

    @property
    def static(self) -> bool:
        return self.granularity == "tensor"

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def tensor_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The stored tensors of a linear whose input uses this quantizer."""
        if not self.static:
            return {}
        specs = {INPUT_SCALE: (torch.float32, (1,))}
        if not self.symmetric:
            specs[INPUT_ZERO_POINT] = (torch.uint8, (1,))
        return specs


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v.abs() + 0.5).copysign(v)


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: ActivationSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32) and zero point (float, asymmetric only) for ranges ``[xmin, xmax]``."""
    xmin = xmin.float().clamp(max=0) * spec.clip_ratio
    xmax = xmax.float().clamp(min=0) * spec.clip_ratio
    if spec.symmetric:
        return torch.maximum(-xmin, xmax) / spec.qmax, None
    scale = (xmax - xmin) / spec.levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(round_half_away(-xmin / safe), 0, spec.levels)
    return scale, zero


def activation_codes(
    x: torch.Tensor,
    spec: ActivationSpec,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes of ``x [..., K]``: ``(q, scale, zero)``.

    Symmetric: ``q`` int8 in ``[-qmax, qmax]``; asymmetric: ``q`` uint8 in ``[0, 2^bits - 1]``.
    Dynamic: ``scale``/``zero`` are ``[..., 1]``, computed here. Static: pass the stored ``scale``
    (``[1]``) and ``zero_point``.
    """
    xf = x.float()
    if spec.static:
        if scale is None:
            raise ValueError("a static (per-tensor) activation quantizer needs its calibrated input_scale")
        scale = scale.float().reshape(1)
        zero = None if spec.symmetric else zero_point.float().reshape(1)  # type: ignore[union-attr]
    else:
        if xf.shape[-1] == 0:
            raise ValueError("cannot quantize an empty activation")
        scale, zero = qparams_from_range(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), spec)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    if spec.symmetric:
        q = round_half_away(xf * inv).clamp_(-spec.qmax, spec.qmax).to(torch.int8)
    else:
        q = (round_half_away(xf * inv) + zero).clamp_(0, spec.levels).to(torch.uint8)
    return q, scale, zero


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    v = q.float() if zero is None else q.float() - zero
    return v * scale


def quantize_activation(
    x: torch.Tensor,
    spec: ActivationSpec,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x``: round to the integer grid and back; returns float32.

    This is the one place the loader quantizes activations; an integer-GEMM backend would call
    :func:`activation_codes` instead and keep ``q`` and ``scale``.
    """
    q, s, z = activation_codes(x, spec, scale, zero_point)
    return dequantize_activation(q, s, z)


class RangeObserver:
    """Running min/max of the inputs one linear sees, for static per-tensor calibration."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().float().amin(), x.detach().float().amax()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def tensors(self, spec: ActivationSpec) -> dict[str, torch.Tensor]:
        """``input_scale`` (and ``input_zero_point``) from the observed range."""
        if self.min is None or self.max is None:
            raise RuntimeError("no activations were observed for static calibration")
        scale, zero = qparams_from_range(self.min.reshape(1), self.max.reshape(1), spec)
        out = {INPUT_SCALE: scale.to(torch.float32).cpu()}
        if zero is not None:
            out[INPUT_ZERO_POINT] = zero.to(torch.uint8).cpu()
        return out
