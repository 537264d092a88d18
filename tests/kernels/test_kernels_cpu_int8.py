"""The W8A8 GEMM on Intel AMX tiles (kernels/cpu_int8.py, ``qdlm_int8_gemm_amx``) and its W4A4 form
over packed int4 codes (``qdlm_int4a_gemm_amx``) against the exact integer product: int32 sums are exact, so the only error is float32 rounding of the two scales'
products (and bf16 rounding of the output when asked for bf16). Runs where the CPU has AMX-INT8;
the refusals are tested everywhere."""

from __future__ import annotations

import pytest
import torch

from qdlm_export import kernels
from qdlm_export.kernels import cpu_int8
from tests.kernel_inputs import random_packed_weight

needs_amx_int8 = pytest.mark.skipif(cpu_int8.unavailable_reason() is not None,
                                    reason=str(cpu_int8.unavailable_reason()))


def _operands(gen, m, k, n):
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return a, torch.rand(m, 1, generator=gen) + 0.05, b, torch.rand(n, generator=gen) + 0.05


@needs_amx_int8
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_int8_gemm_is_the_exact_integer_product(gen, threads):
    """Many tokens (M = 200, and 65 just above the few-token slabs): K = 1088, a slab of 1024 inputs and
    one of 64; N = 272, shares of whole 32-output panels and a last 16-output one. Few tokens (M <= 64):
    K = 4160, a slab of 4096 and one of 64; N = 80, a block of 64 outputs and one of 16. M = 1, 15, 33,
    65, 200: zero-padded last blocks of 32 tokens."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k, n in [(1, 64, 16), (15, 1088, 272), (15, 4160, 80), (33, 192, 48), (65, 1088, 272), (200, 1088, 272)]:
            a, a_s, b, b_s = _operands(gen, m, k, n)
            exact = (a.double() @ b.double().T) * a_s.double() * b_s.double()
            y = cpu_int8.int8_gemm_amx(a, a_s, b, b_s, None, torch.float32)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert torch.all((y.double() - exact).abs() <= 2**-22 * exact.abs() + 1e-30), (m, k, n)
            bias = torch.randn(n, generator=gen)
            y16 = cpu_int8.int8_gemm_amx(a.view(1, m, k), a_s.view(1, m, 1), b, b_s, bias, torch.bfloat16)
            want = (exact + bias.double()).view(1, m, n)
            assert y16.dtype == torch.bfloat16 and torch.all((y16.double() - want).abs() <= 2**-8 * want.abs() + 1e-6)
    finally:
        torch.set_num_threads(before)


@needs_amx_int8
def test_auto_runs_amx_at_every_token_count(gen):
    pick = lambda m: kernels.select_backend("int8_gemm", "cpu", M=m, K=4096, N=4096).name  # noqa: E731
    assert pick(1) == pick(16) == pick(4096) == "cpu_amx"
    assert kernels.select_backend("int8_gemm", "cpu", M=16, K=100, N=4096).name == "torch._int_mm"  # K it cannot tile
    a, a_s, b, b_s = _operands(gen, 40, 128, 32)
    got = kernels.int8_gemm(a, a_s, b, b_s, None, torch.float32)
    exact = (a.double() @ b.double().T) * a_s.double() * b_s.double()
    assert torch.allclose(got.double(), exact, rtol=2**-22, atol=0)


def test_shapes_it_cannot_tile_are_refused_with_the_reason():
    assert "multiple of 64" in cpu_int8.unsupported_reason(K=100, N=32)
    assert "multiple of 16" in cpu_int8.unsupported_reason(K=128, N=40)
    assert "CPU tensors" in cpu_int8.unsupported_reason(K=128, N=32, device="meta")
    assert kernels.describe_backend("int8_gemm", "cpu", M=256, K=100, N=32).startswith("torch._int_mm")


needs_native = pytest.mark.skipif(cpu_int8.quantize_unsupported_reason() is not None,
                                  reason=str(cpu_int8.quantize_unsupported_reason()))


@needs_native
@pytest.mark.parametrize("bits,clip", [(8, 1.0), (8, 0.9), (4, 0.85)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_quantizer_gives_the_torch_backends_codes_bit_for_bit(gen, bits, clip, dtype):
    """bf16 rows and float32 rows (what the loader's online transforms give): K tails (100, 17), an
    all-zero row, a 3-D batch, and values across magnitudes."""
    from qdlm_export.kernels.int8 import quantize_per_token_torch

    for shape in [(3, 100), (2, 5, 4096), (7, 17)]:
        x = (torch.randn(*shape, generator=gen) * (torch.rand(*shape[:-1], 1, generator=gen) * 8)).to(dtype)
        x.view(-1, shape[-1])[1] = 0
        q, s = cpu_int8.quantize_rows(x, bits, clip)
        q_ref, s_ref = quantize_per_token_torch(x, bits, clip)
        assert q.shape == q_ref.shape and s.shape == s_ref.shape
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref), shape
        assert int(q.abs().max()) == (127 if bits == 8 else 7) or clip < 1  # codes reach the end of the range


@needs_native
def test_auto_quantizes_bf16_and_float32_rows_natively_and_other_dtypes_in_torch():
    pick = lambda dtype: kernels.select_backend("quantize_per_token", "cpu", M=4, K=64, bits=8, dtype=dtype).name  # noqa: E731
    assert pick(torch.bfloat16) == pick(torch.float32) == "cpu_native"
    assert pick(torch.float16) == pick(torch.float64) == "torch"
    assert "bf16 or float32" in cpu_int8.quantize_unsupported_reason(dtype=torch.float16)


@needs_amx_int8
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_amx_packed_path_is_the_exact_integer_product_of_the_checkpoint_codes(gen, threads, bits, symmetric):
    """W4A4 and W8A8 per channel from the checkpoint's packed codes: bit for bit the torch backend's
    float32 result (exact int32 sums of q - z times the quantized activations, then the same two
    scales), across the few-token slabs (K = 4160: 4096 + 64) and the many-token ones (K = 1088),
    output shares of 32 and a last 16, symmetric (zero 8 or 128) and per-row zero points, rows wider
    than their codes."""
    from qdlm_export.kernels.int8 import packed_int_linear_torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k, n in [(1, 64, 16), (15, 4160, 80), (33, 1088, 272), (65, 1088, 48), (200, 192, 48)]:
            _, wp, scale, zp = random_packed_weight(gen, n, k, bits, -1, symmetric)
            words = k * bits // 32
            wide = torch.randint(0, 2**31 - 1, (n, words + 8), generator=gen, dtype=torch.int32)
            wide[:, :words] = wp
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            x_q, x_s = kernels.quantize_per_token(x, bits)
            bias = torch.randn(n, generator=gen)
            want = packed_int_linear_torch(x_q, x_s, wp, scale, zp, bits, -1, k, bias, torch.float32)
            got = cpu_int8.packed_int_linear_amx(x_q, x_s, wide[:, :words], scale, zp, bits, -1, k, bias, torch.float32)
            assert torch.equal(got, want), (m, k, n, (got - want).abs().max())
    finally:
        torch.set_num_threads(before)


@needs_amx_int8
def test_packed_auto_runs_amx_per_channel_only(gen):
    """What loaded W4A4 and W8A8 checkpoints run on a CPU with AMX: the AMX path per channel (4 bits,
    or 8 bits symmetric); grouped and asymmetric 8-bit weights stay on the torch path, with reasons."""
    pick = lambda **kw: kernels.select_backend("packed_int_linear", "cpu", **{**dict(M=16, K=4096, N=4096, bits=4, group_size=-1, symmetric=True), **kw}).name  # noqa: E731
    assert pick() == pick(M=4096) == pick(symmetric=False) == pick(bits=8) == pick(bits=8, M=1) == "cpu_amx"
    assert pick(group_size=128) == pick(bits=8, symmetric=False) == pick(bits=3) == "torch"
    assert "per-channel" in cpu_int8.packed_unsupported_reason(bits=4, group_size=128, K=4096, N=4096)
    assert "asymmetric 8-bit" in cpu_int8.packed_unsupported_reason(bits=8, symmetric=False, K=4096, N=4096)
    _, wp, scale, zp = random_packed_weight(gen, 32, 256, 4, -1, True)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    got = kernels.w4a4_linear(x, wp, scale, None, -1, 256)
    x_q, x_s = kernels.quantize_per_token(x, 4)
    from qdlm_export.kernels.int8 import packed_int_linear_torch

    assert torch.equal(got, packed_int_linear_torch(x_q, x_s, wp, scale, None, 4, -1, 256, None, torch.bfloat16))
