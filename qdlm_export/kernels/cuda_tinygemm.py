"""Weight-only 4-bit linear on CUDA through torch's int4 tensor-core kernel ("tinygemm"), repacked once.

    y = x @ W_hat.T + bias,   W_hat[n, k] = (q[n, k] - z[n, g]) * s[n, g]   (as in weight_only.py)

``aten._weight_int4pack_mm(x, w, group, scale_and_zero)`` is the CUDA int4 GEMM that gpt-fast and
torchao's int4 weight-only path run: it reads the codes in the tensor-core tile layout made by
``aten._convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)`` (code ``2j`` in the *high* nibble
of byte ``j``) and computes ``w = (q - 8) * scale + zero`` with ``scale_and_zero`` bf16
``[K/group, N, 2]``, the arithmetic of its CPU twin (``cpu_packed.py``, which builds that tensor for
both). Our checkpoint keeps code ``2j`` in the *low* nibble, so the conversion's input is the
checkpoint's bytes with their nibbles swapped: no unpacking.

Needs a GPU of compute capability 8.0 or newer, bf16 activations, ``N % 8 == 0``, ``K`` a multiple
of 32 and a group that is a multiple of 32 (coarser groups repeat their scales, as on the CPU).

Why it is here: on an H200 (docs/benchmarks.md, 2026-12-04) our fused Triton kernel ran W4A16 at
0.28-0.43x dense at 16 tokens, where the issue asks for 2.5x; this is the kernel the field uses for
that case. ``bench`` and ``gpu_check.sh`` time it beside the Triton backends; ``auto`` does not pick
it until a GPU run has measured where it wins. The tile layout is held *beside* the checkpoint's
tensors (another 0.25x the bf16 bytes at 4 bits); ``bench`` counts it.
"""

from __future__ import annotations

import functools

import torch

from ._triton import cuda_capability
from .cpu_packed import int4_kernel_group, int4_scale_and_zero
from .layouts import LayoutCache, tensors_key
from .weight_only import scale_groups

MIN_CAPABILITY = (8, 0)


@functools.cache
def torch_before_uint8_converter() -> bool:
    """torch before 2.5 took int32 codes in ``_convert_weight_to_int4pack`` (PR 129940 changed it)."""
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) < (2, 5)


def _inner_k_tiles(in_features: int) -> int | None:
    """The largest tile count (8, 4, 2) the converter takes with ``K % (16 * tiles) == 0``."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def unsupported_reason(
    *,
    bits: int | None = None,
    group_size: int | None = None,
    in_features: int | None = None,
    out_features: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    **_: object,
) -> str | None:
    """None when :func:`weight_only_linear_tinygemm` takes this problem, else why not."""
    if device is not None and torch.device(device).type != "cuda":
        return "torch's int4 tensor-core kernel needs CUDA tensors"
    if not all(hasattr(torch.ops.aten, op) for op in ("_weight_int4pack_mm", "_convert_weight_to_int4pack")):
        return f"torch {torch.__version__} lacks aten._weight_int4pack_mm"
    if torch_before_uint8_converter():
        return f"torch {torch.__version__}: the int4 converter takes uint8 [N, K/2] from torch 2.5 on"
    if device is not None and not torch.cuda.is_available():
        return "CUDA is not available in this torch"
    if device is not None and (cuda_capability(torch.device(device).index) or (0, 0)) < MIN_CAPABILITY:
        return "torch's int4 tensor-core kernel needs compute capability 8.0 or newer"
    if bits not in (None, 4):
        return f"{bits}-bit weights: torch's int4 tensor-core kernel takes 4 bits only"
    if dtype is not None and dtype != torch.bfloat16:
        return f"activations in {dtype}: torch's int4 tensor-core kernel takes bfloat16"
    if in_features is not None and _inner_k_tiles(in_features) is None:
        return f"in_features {in_features} is not a multiple of 32"
    if group_size is not None and in_features is not None and int4_kernel_group(group_size, in_features) is None:
        return f"group_size {group_size} with in_features {in_features}: needs a multiple of 32 dividing in_features"
    if out_features is not None and out_features % 8:
        return f"out_features {out_features} is not a multiple of 8"
    return None


def tinygemm_input_bytes(weight_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 ``[N, K/2]``, code ``2j`` in the high nibble of byte ``j``, from our 4-bit packed rows
    (code ``2j`` in the low nibble: core/packing.py)."""
    b = weight_packed.contiguous().view(torch.uint8)[:, : in_features // 2]
    return ((b & 0x0F) << 4) | (b >> 4)


class _Repacked:
    def __init__(self, weight: torch.Tensor, scale_and_zero: torch.Tensor, kernel_group: int, key: tuple):
        self.weight, self.scale_and_zero, self.kernel_group, self.key = weight, scale_and_zero, kernel_group, key

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale_and_zero))


_CACHE = LayoutCache()


def prepare(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> _Repacked:
    """The cached tile layout of ``weight_packed`` (made now if absent or if an input changed)."""
    key = (tensors_key(weight_packed, weight_scale, weight_zero_point), group_size, in_features)
    hit = _CACHE.current(weight_packed, key)
    if hit is not None:
        return hit
    kg = int4_kernel_group(group_size, in_features)
    sz = int4_scale_and_zero(weight_scale, weight_zero_point, group_size, in_features, kg, torch.bfloat16)
    tiles = _inner_k_tiles(in_features)
    weight = torch.ops.aten._convert_weight_to_int4pack(tinygemm_input_bytes(weight_packed, in_features), tiles)
    return _CACHE.put(weight_packed, _Repacked(weight, sz.to(weight_packed.device), kg, key))


cached_nbytes = _CACHE.nbytes  # bytes held beside a weight for this kernel (0 before its first call)


def weight_only_linear_tinygemm(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., in] @ W_hat.T + bias`` through torch's int4 tensor-core kernel, in bf16."""
    reason = unsupported_reason(bits=bits, group_size=group_size, in_features=in_features,
                                out_features=weight_packed.shape[0], dtype=x.dtype, device=x.device)
    if reason:
        raise ValueError(f"tinygemm weight-only GEMM: {reason}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    scale_groups(weight_scale, weight_packed.shape[0], group_size, in_features)
    p = prepare(weight_packed, weight_scale, weight_zero_point, group_size, in_features)
    x2 = x.reshape(-1, in_features).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, p.weight, p.kernel_group, p.scale_and_zero)
    if bias is not None:  # in float32, rounded once (as the Triton backend's epilogue)
        y = (y.float() + bias.float()).to(y.dtype)
    return y.reshape(*x.shape[:-1], -1)
