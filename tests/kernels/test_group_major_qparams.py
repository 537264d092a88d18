"""The group-major scales and zero points the Triton GEMMs read (``layouts.group_major_qparams``).

Made once per weight and held beside it: float32 scales and int32 zero points stored ``[..., groups, N]``
(N contiguous, which Triton's pipeliner can copy ahead of the K loop), seen in the checkpoint's
``[..., N, groups]`` index order. The GEMM tests (test_kernels.py, test_grouped_experts.py) run every
Triton case through it; these check the layout itself and its cache.
"""

from __future__ import annotations

import pytest
import torch

from qdlm_export.kernels.layouts import group_major_nbytes, group_major_qparams
from tests.kernel_inputs import DEV, needs_triton, random_packed_weight


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_values_exact_in_group_major_storage(gen, scale_dtype):
    n_out, k, group = 48, 256, 32
    _, packed, scale, zero = random_packed_weight(gen, n_out, k, 4, group, symmetric=False, scale_dtype=scale_dtype)
    s, z = group_major_qparams(packed, scale, zero)
    groups = k // group
    assert s.shape == (n_out, groups) and s.dtype == torch.float32 and s.stride() == (1, n_out)
    assert z.shape == (n_out, groups) and z.dtype == torch.int32 and z.stride() == (1, n_out)
    # every float dtype's values are exact in float32, every uint8 zero point in int32
    assert torch.equal(s.double(), scale.double()) and torch.equal(z.long(), zero.long())
    assert group_major_nbytes(packed) == n_out * groups * (4 + 4)


def test_made_once_and_made_again_when_an_input_changes(gen):
    _, packed, scale, _ = random_packed_weight(gen, 32, 128, 4, 64, symmetric=True, scale_dtype=torch.bfloat16)
    s1, z1 = group_major_qparams(packed, scale, None)
    s2, _ = group_major_qparams(packed, scale, None)
    assert z1 is None and s2 is s1  # the held copy: no work per call
    scale.mul_(2)  # a reloaded or edited checkpoint tensor, changed in place
    s3, _ = group_major_qparams(packed, scale, None)
    assert s3 is not s1 and torch.equal(s3.double(), scale.double())
    other = scale.clone().add_(1)
    assert torch.equal(group_major_qparams(packed, other, None)[0].double(), other.double())
    other.data = other.data * 4  # a .data swap keeps the tensor and its version: its storage is new
    assert torch.equal(group_major_qparams(packed, other, None)[0].double(), other.double())


def test_per_channel_comes_back_as_given(gen):
    """One group: the GEMMs read it once per tile, outside the K loop; nothing is made or held."""
    _, packed, scale, zero = random_packed_weight(gen, 32, 128, 4, -1, symmetric=False)
    s, z = group_major_qparams(packed, scale, zero)
    assert s is scale and z is zero and group_major_nbytes(packed) == 0


def test_stacked_experts_group_major_per_expert(gen):
    experts, n_out, k, group = 3, 16, 128, 32
    scale = torch.rand(experts, n_out, k // group, generator=gen).to(torch.bfloat16)
    zero = torch.randint(0, 16, (experts, n_out, k // group), generator=gen, dtype=torch.uint8)
    packed = torch.randint(-(2**31), 2**31 - 1, (experts, n_out, k // 8), generator=gen, dtype=torch.int32)
    s, z = group_major_qparams(packed, scale, zero)
    assert s.stride() == (n_out * k // group, 1, n_out) and z.stride() == s.stride()
    assert torch.equal(s.double(), scale.double()) and torch.equal(z.long(), zero.long())


@needs_triton
def test_triton_gemm_sees_a_scale_changed_in_place(gen):
    """The held copy follows the checkpoint tensor: scales doubled in place double the output, exactly
    (a power of two commutes with every rounding on the way)."""
    from qdlm_export.kernels.weight_only_triton import weight_only_linear_triton

    n_out, k, group = 64, 256, 64
    _, packed, scale, zero = random_packed_weight(gen, n_out, k, 4, group, symmetric=False, scale_dtype=torch.bfloat16)
    packed, scale, zero = packed.to(DEV), scale.to(DEV), zero.to(DEV)
    x = torch.randn(5, k, generator=gen).to(DEV, torch.bfloat16)
    y1 = weight_only_linear_triton(x, packed, scale, zero, 4, group, k)
    scale.mul_(2)
    y2 = weight_only_linear_triton(x, packed, scale, zero, 4, group, k)
    assert torch.equal(y2, 2 * y1) and y1.abs().max() > 0
