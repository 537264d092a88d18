"""torch's int4 tensor-core kernel as a weight-only backend (kernels/cuda_tinygemm.py).

The layout conversions are checked everywhere against references built from the codes; the kernel
itself runs only on a CUDA GPU (benchmarks/gpu_check.sh runs this file natively there).
"""

from __future__ import annotations

import pytest
import torch

from qdlm_export import kernels
from qdlm_export.kernels import cuda_tinygemm as T
from qdlm_export.kernels.cpu_packed import int4_kernel_group, int4_scale_and_zero
from tests.kernel_inputs import GPU, random_packed_weight
from tests.kernels.test_kernels import assert_close, ref_linear, ref_weight

needs_cuda = pytest.mark.skipif(not GPU, reason="torch's int4 tensor-core kernel runs on CUDA only")


@pytest.mark.skipif(T.torch_before_uint8_converter(), reason="torch < 2.5 converts int32 codes")
def test_input_bytes_hold_code_2j_in_the_high_nibble(gen):
    codes, packed, _, _ = random_packed_weight(gen, 24, 96, 4, 32, True)
    b = T.tinygemm_input_bytes(packed, 96)
    assert b.dtype == torch.uint8 and b.shape == (24, 48)
    assert torch.equal(b.to(torch.int32), codes[:, 0::2].to(torch.int32) * 16 + codes[:, 1::2].to(torch.int32))
    # torch's own shape checks take it: [N/8, K/(16 * tiles), 32, tiles/2] int32
    tiles = T._inner_k_tiles(96)
    assert tiles == 2
    tiled = torch.ops.aten._convert_weight_to_int4pack(b.to("meta"), tiles)
    assert tuple(tiled.shape) == (3, 3, 32, 1) and tiled.dtype == torch.int32
    # and the GEMM's shape rules (its fake-tensor implementation) take what weight_only_linear_tinygemm passes
    from torch._subclasses.fake_tensor import FakeTensorMode

    sz = int4_scale_and_zero(torch.rand(24, 3), None, 32, 96, 32, torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        w = torch.ops.aten._convert_weight_to_int4pack(b, tiles)
        y = torch.ops.aten._weight_int4pack_mm(torch.empty(5, 96, dtype=torch.bfloat16), w, 32, sz)
    assert tuple(y.shape) == (5, 24) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("group,symmetric", [(32, False), (128, True), (-1, False), (96, False)])
def test_scale_and_zero_give_the_dequantized_weight(gen, group, symmetric):
    """The kernels' ``(q - 8) * scale + zero`` with the bf16 ``scale_and_zero`` we build is our
    ``(q - z) * s`` (float64, from the codes) up to the bf16 rounding of scale and zero; coarser groups
    (-1, 96) repeat over the kernel's groups."""
    n, k = 16, 384
    codes, _, scale, zero = random_packed_weight(gen, n, k, 4, group, symmetric, torch.float32)
    kg = int4_kernel_group(group, k)
    sz = int4_scale_and_zero(scale, zero, group, k, kg, torch.bfloat16)
    assert sz.shape == (k // kg, n, 2) and sz.dtype == torch.bfloat16
    s = sz[..., 0].double().T.repeat_interleave(kg, dim=1)  # [n, k]
    zf = sz[..., 1].double().T.repeat_interleave(kg, dim=1)
    w = (codes.double() - 8) * s + zf
    ref = ref_weight(codes, scale, zero, 4, group)
    g = k if group == -1 else group
    z = (torch.full(scale.shape, 8.0) if zero is None else zero).double().repeat_interleave(g, dim=1)
    bound = ((codes.double() - 8).abs() + (8 - z).abs()) * scale.double().repeat_interleave(g, dim=1) * 2**-8
    assert ((w - ref).abs() <= bound + 1e-12).all()
    if symmetric:
        assert (sz[..., 1] == 0).all()


def test_unsupported_problems_say_why():
    reason = T.unsupported_reason
    assert "CUDA" in reason(device=torch.device("cpu"))
    assert "bfloat16" in reason(dtype=torch.float16)
    assert "4 bits" in reason(bits=8)
    assert "multiple of 32" in reason(in_features=100)
    assert "group_size 48" in reason(group_size=48, in_features=96 * 4)
    assert "multiple of 8" in reason(out_features=20)
    assert reason(bits=4, group_size=128, in_features=4096, out_features=12288, dtype=torch.bfloat16) is None
    if not GPU:
        with pytest.raises(kernels.KernelBackendError, match="CUDA"):
            kernels.select_backend("weight_only_linear", "cpu", backend="cuda_tinygemm", M=4, K=256, N=64,
                                   bits=4, group_size=128, symmetric=True, dtype=torch.bfloat16)


def test_auto_does_not_pick_it_before_a_gpu_has_measured_it():
    record = next(b for b in kernels.backends_for("weight_only_linear") if b.name == "cuda_tinygemm")
    for m in (1, 16, 1024):
        problem = kernels.Problem("weight_only_linear", torch.device("cuda"), dict(M=m, K=4096, N=4096, bits=4,
                                                                                  group_size=128, dtype=torch.bfloat16))
        assert record.auto(problem) is False


@needs_cuda
@pytest.mark.parametrize("m", (1, 16, 100))
@pytest.mark.parametrize("group,symmetric", [(32, False), (128, True), (-1, False)])
def test_tinygemm_matches_the_float64_reference(gen, m, group, symmetric):
    k, n = 512, 96
    codes, packed, scale, zero = random_packed_weight(gen, n, k, 4, group, symmetric, torch.bfloat16)
    x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    dev = torch.device("cuda")
    args = [t.to(dev) if t is not None else None for t in (x, packed, scale, zero)]
    y = kernels.weight_only_linear(*args, 4, group, k, bias.to(dev), backend="cuda_tinygemm")
    assert y.shape == (2, m, n) and y.dtype == torch.bfloat16
    assert_close(y.cpu(), *ref_linear(x, ref_weight(codes, scale, zero, 4, group), bias), 1e-2, f"M={m}")
    assert T.cached_nbytes(args[1]) > 0
