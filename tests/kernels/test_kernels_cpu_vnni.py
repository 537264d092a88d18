"""W8A8 and W4A4 with few tokens on AVX512-VNNI (kernels/cpu_int8.py, ``qdlm_int_gemm_vnni``): the
stored per-channel codes times int8 activations, bit for bit the torch backend's result (exact int32
sums of (q - z) * x_q, then the same two float32 scales), which is checked against float64 here as
well. Runs where the CPU has AVX512-VNNI; the refusals are tested everywhere."""

from __future__ import annotations

import pytest
import torch

from qdlm_export import kernels
from qdlm_export.kernels import cpu_int8
from qdlm_export.kernels.int8 import packed_int_linear_torch
from tests.kernel_inputs import random_packed_weight

VNNI_REASON = cpu_int8.vnni_unsupported_reason(bits=8, symmetric=True, device="cpu")
needs_vnni = pytest.mark.skipif(VNNI_REASON is not None, reason=str(VNNI_REASON))


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, True), (4, False)])
def test_vnni_path_is_the_torch_backend_bit_for_bit(gen, threads, bits, symmetric):
    """8-bit codes (zero 128) and 4-bit ones (zero 8, or one per row); K not a multiple of 64 or 128
    (masked last steps, activations zero-padded) and over them; N not a multiple of the 4-row block or
    of the 16-row thread share; M = 1 ... 70 (token blocks of 6 with narrower last ones, and a second
    pass over the weight above 64 tokens), as one batch or two; rows wider than their codes; bias; bf16
    and float32 out."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k, n in [(1, 64, 16), (5, 104, 37), (16, 1088, 50), (13, 4096, 20), (140, 328, 66), (3, 200, 24)]:
            codes, wp, scale, zp = random_packed_weight(gen, n, k, bits, -1, symmetric)
            words = wp.shape[1]
            wide = torch.randint(-2**31, 2**31 - 1, (n, words + 8), generator=gen, dtype=torch.int32)
            wide[:, :words] = wp
            lead = (m,) if m % 2 else (2, m // 2)  # M = m either way
            x = torch.randn(*lead, k, generator=gen).to(torch.bfloat16)
            x_q, x_s = kernels.quantize_per_token(x, bits)
            bias = torch.randn(n, generator=gen)
            for out_dtype in (torch.float32, torch.bfloat16):
                want = packed_int_linear_torch(x_q, x_s, wp, scale, zp, bits, -1, k, bias, out_dtype)
                got = cpu_int8.packed_int_linear_vnni(x_q, x_s, wide[:, :words], scale, zp, bits, -1, k, bias, out_dtype)
                assert got.dtype == out_dtype and got.shape == (*lead, n)
                assert torch.equal(got, want), (m, k, n, out_dtype, (got.double() - want.double()).abs().max())
            zero = 2 ** (bits - 1) if zp is None else zp.double().view(n, 1)
            w = codes.double() - zero  # [n, k]: q - z
            exact = (x_q.double() @ w.T) * x_s.double() * scale.double().view(n) + bias.double()
            got = cpu_int8.packed_int_linear_vnni(x_q, x_s, wp, scale, zp, bits, -1, k, bias, torch.float32)
            assert torch.all((got.double() - exact).abs() <= 2**-21 * (exact.abs() + bias.double().abs()) + 1e-30)
    finally:
        torch.set_num_threads(before)


@needs_vnni
def test_extreme_codes_and_activations_stay_exact(gen):
    """Every product at its largest magnitude (q = 0 against x_q = -127, and q = 255), over K = 98304
    inputs: sum(x_q * q) reaches 127 * 255 * K > 2^31 and wraps around in int32, and the result
    sum(x_q * (q - 128)), which fits, must still come out exact."""
    k, n = 98304, 8
    wp = torch.zeros(n, k // 4, dtype=torch.int32)
    wp.view(torch.uint8)[:4] = 0
    wp.view(torch.uint8)[4:] = 255
    x_q = torch.full((3, k), -127, dtype=torch.int8)
    x_q[1] = 127
    x_q[2, ::2] = 127
    x_s, scale = torch.ones(3, 1), torch.ones(n)
    got = cpu_int8.packed_int_linear_vnni(x_q, x_s, wp, scale, None, 8, -1, k, None, torch.float32)
    codes = wp.view(torch.uint8).double() - 128
    assert torch.equal(got.double(), x_q.double() @ codes.T)


@needs_vnni
def test_auto_runs_vnni_for_few_tokens_where_there_is_no_amx(gen):
    pick = lambda **kw: kernels.select_backend("packed_int_linear", "cpu", **{**dict(M=16, K=4096, N=4096, bits=8, group_size=-1, symmetric=True), **kw}).name  # noqa: E731
    few = "cpu_amx" if cpu_int8.unavailable_reason() is None else "cpu_vnni"
    assert pick() == pick(M=1) == pick(M=128) == few
    assert pick(M=129) == pick(M=4096) == ("cpu_amx" if few == "cpu_amx" else "torch")
    assert pick(bits=4) == pick(bits=4, M=256) == pick(bits=4, symmetric=False) == few  # W4A4 wins up to 256
    assert pick(bits=4, M=257) == ("cpu_amx" if few == "cpu_amx" else "torch")
    assert kernels.select_backend("packed_int_linear", "cpu", "cpu_vnni", M=4096, K=4096, N=4096, bits=8,
                                  group_size=-1, symmetric=True).name == "cpu_vnni"  # asked for: runs at any M
    _, wp, scale, _ = random_packed_weight(gen, 48, 256, 8, -1, True)
    x = torch.randn(7, 256, generator=gen).to(torch.bfloat16)
    x_q, x_s = kernels.quantize_per_token(x, 8)
    got = kernels.packed_int_linear(x_q, x_s, wp, scale, None, 8, -1, 256)
    assert torch.equal(got, packed_int_linear_torch(x_q, x_s, wp, scale, None, 8, -1, 256, None, torch.bfloat16))


def test_what_the_vnni_path_does_not_take_is_refused_with_the_reason():
    assert "3-bit" in cpu_int8.vnni_unsupported_reason(bits=3, symmetric=True, device="cpu")
    assert "asymmetric" in cpu_int8.vnni_unsupported_reason(bits=8, symmetric=False, device="cpu")
    assert "per-channel" in cpu_int8.vnni_unsupported_reason(bits=8, group_size=128, K=4096, device="cpu")
    assert "CPU tensors" in cpu_int8.vnni_unsupported_reason(bits=8, device="meta")
    x_q = torch.zeros(2, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="asymmetric"):
        cpu_int8.packed_int_linear_vnni(x_q, torch.ones(2, 1), torch.zeros(4, 16, dtype=torch.int32), torch.ones(4),
                                        torch.full((4, 1), 128), 8, -1, 64)
    with pytest.raises(ValueError, match="x_q must be int8"):
        cpu_int8.packed_int_linear_vnni(x_q.float(), torch.ones(2, 1), torch.zeros(4, 16, dtype=torch.int32),
                                        torch.ones(4), None, 8, -1, 64)


@needs_vnni
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, True), (4, False)])
def test_no_tokens_give_an_empty_output(gen, bits, symmetric):
    _, wp, scale, zp = random_packed_weight(gen, 24, 256, bits, -1, symmetric)
    x_q, x_s = torch.zeros(0, 256, dtype=torch.int8), torch.ones(0, 1)
    got = cpu_int8.packed_int_linear_vnni(x_q, x_s, wp, scale, zp, bits, -1, 256)
    assert got.shape == (0, 24) and got.dtype == torch.bfloat16


@needs_vnni
def test_tensors_the_c_function_would_read_past_are_refused(gen):
    """A per-tensor scale, a zero point per group or a weight shorter than in_features would be read
    past its end by the C function: each is refused with what it should be."""
    _, wp, scale, _ = random_packed_weight(gen, 24, 256, 8, -1, True)
    x_q, x_s = torch.randint(-127, 128, (3, 256), generator=gen, dtype=torch.int8), torch.rand(3, 1, generator=gen)
    with pytest.raises(ValueError, match="x_scale has 1 elements"):
        cpu_int8.packed_int_linear_vnni(x_q, x_s[:1], wp, scale, None, 8, -1, 256)
    with pytest.raises(ValueError, match="weight_scale has 1 elements"):
        cpu_int8.packed_int_linear_vnni(x_q, x_s, wp, scale[:1], None, 8, -1, 256)
    with pytest.raises(ValueError, match="weight_packed must be int32"):
        cpu_int8.packed_int_linear_vnni(x_q, x_s, wp[:, :32], scale, None, 8, -1, 256)
    _, wp4, scale4, zp4 = random_packed_weight(gen, 24, 256, 4, -1, False)
    with pytest.raises(ValueError, match="weight_zero_point has 48 elements"):
        cpu_int8.packed_int_linear_vnni(x_q.clamp(-7, 7), x_s, wp4, scale4, zp4.repeat(1, 2), 4, -1, 256)
