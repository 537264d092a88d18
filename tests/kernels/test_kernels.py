"""Kernels against float64 references built here from the unpacked codes (never from kernel helpers).

Triton cases run compiled on a CUDA GPU when there is one, else in the CPU interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py before any Triton kernel module is imported); they
are skipped when triton is not installed. Inputs are fresh random draws on every run (the seed is printed, so a failure can be replayed with QDLM_TEST_SEED=<seed>);
buffers a kernel writes into are poisoned first. Tolerances are relative to ``sum |x| |w|`` (plus
``|bias|``), the natural scale of rounding errors in a dot product.
"""

from __future__ import annotations

import pytest
import torch

from qdlm_export import kernels
from qdlm_export.core import transforms
from qdlm_export.core.activations import ActivationSpec, activation_codes
from qdlm_export.core.packing import pack_rows, unpack_rows
from qdlm_export.core.schemes import WeightScheme, dequantize
from qdlm_export.kernels import cpu_native, registry
from qdlm_export.kernels.int8 import (
    int8_gemm_torch,
    packed_int_linear_torch,
    quantize_per_token_torch,
)
from qdlm_export.kernels.weight_only import (
    dequantize_packed,
    unpack_codes,
    weight_only_linear_torch,
)
from tests.kernel_inputs import DEV, HAS_TRITON, needs_triton, random_packed_weight

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 3e-5}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------------------------


def ref_weight(codes, scale, zero, bits, group):
    """float64 ``(q - z) * s`` straight from the codes."""
    n_out, k = codes.shape
    g = k if group == -1 else group
    z = zero.double() if zero is not None else torch.full(scale.shape, float(2 ** (bits - 1)), dtype=torch.float64)
    w = (codes.double().view(n_out, k // g, g) - z.unsqueeze(-1)) * scale.double().unsqueeze(-1)
    return w.view(n_out, k)


def ref_linear(x, w64, bias):
    """float64 ``x @ w.T + b`` and the error scale ``|x| @ |w|.T + |b|``."""
    x64 = x.double().reshape(-1, x.shape[-1])
    y = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y.view(*x.shape[:-1], -1), mag.view(*x.shape[:-1], -1)


def assert_close(y, ref, mag, rtol, what):
    assert torch.isfinite(y).all(), f"{what}: non-finite output (poisoned buffer not fully written?)"
    err = (y.double() - ref).abs()
    bound = rtol * mag + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the tolerance (max abs err {err.max().item():.3e})"


def nan_buffer(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def on_dev(*tensors):
    return [t.to(DEV) if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------------------------
# Unpacking and the torch weight-only backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_unpack_codes_matches_format(gen, bits):
    for k in (1, 3, 10, 11, 21, 22, 31, 32, 33, 95, 96, 97, 1000):
        codes = torch.randint(0, 1 << bits, (5, k), generator=gen, dtype=torch.uint8)
        packed = pack_rows(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, k), codes), k
        assert torch.equal(unpack_codes(packed, bits, k), unpack_rows(packed, bits, k)), k
        wide = torch.cat([packed, packed], dim=1)[:, : packed.shape[1]]  # non-contiguous rows
        assert torch.equal(unpack_codes(wide, bits, k), codes), k


def test_unpack_codes_rejects_wrong_width():
    with pytest.raises(ValueError, match="words"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 4, 64)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", (True, False))
def test_dequantize_packed_is_bit_exact_with_quantization_module(gen, bits, symmetric):
    scheme = WeightScheme(bits=bits, group_size=64, symmetric=symmetric)
    codes, packed, scale, zero = random_packed_weight(gen, 48, 192, bits, 64, symmetric, torch.bfloat16)
    for dtype in DTYPES:
        expect = dequantize(codes, scale, zero, scheme, dtype)
        assert torch.equal(dequantize_packed(packed, scale, zero, bits, 64, 192, dtype), expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("bits", BITS)
def test_weight_only_torch(gen, bits, symmetric, group, dtype):
    k = 100 if group == -1 else 3 * group  # per channel: K unrelated to any block size
    n_out = 72
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, symmetric, SCALE_DTYPES[bits % 3])
    w64 = ref_weight(codes, scale, zero, bits, group)
    for shape in ((1, k), (1000, k), (2, 3, k)):
        x = torch.randn(shape, generator=gen).to(dtype)
        bias = torch.randn(n_out, generator=gen).to(dtype) if shape[0] != 1 else None
        y = weight_only_linear_torch(x, packed, scale, zero, bits, group, k, bias)
        assert y.dtype == dtype and y.shape == (*shape[:-1], n_out)
        assert_close(y, *ref_linear(x, w64, bias), RTOL[dtype], f"torch {shape}")


@pytest.mark.parametrize("bits", (3, 4))
def test_torch_paths_dequantize_large_weights_in_row_blocks(gen, monkeypatch, bits):
    """Weights above CPU_DEQUANT_BLOCK_ELEMENTS are dequantized a block of rows at a time (the last
    block shorter); every row's zero points, scales and bias must still meet its own output column."""
    from qdlm_export.kernels import weight_only

    monkeypatch.setattr(weight_only, "CPU_DEQUANT_BLOCK_ELEMENTS", 64 * 256)  # 64 rows a block
    k, n_out, group = 256, 200, 64  # 4 blocks: 64, 64, 64, 8 rows
    assert [r.stop - r.start for r in weight_only.cpu_row_blocks(n_out, k, torch.device("cpu"))] == [64, 64, 64, 8]
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, False, torch.float32)
    w64 = ref_weight(codes, scale, zero, bits, group)
    bias = torch.randn(n_out, generator=gen)
    x = torch.randn(2, 5, k, generator=gen)
    y = weight_only_linear_torch(x, packed, scale, zero, bits, group, k, bias)
    assert y.shape == (2, 5, n_out)
    assert_close(y, *ref_linear(x, w64, bias), RTOL[torch.float32], "blocked torch weight-only")
    x_q = torch.randint(-7, 8, (9, k), generator=gen, dtype=torch.int8)
    x_s = torch.rand(9, 1, generator=gen) * 0.1 + 0.01
    y = packed_int_linear_torch(x_q, x_s, packed, scale, zero, bits, group, k, bias, torch.float32)
    ref = ref_linear(x_q.double() * x_s.double(), w64, bias)
    assert_close(y, *ref, RTOL[torch.float32], "blocked torch packed int")


@pytest.mark.parametrize(("bits", "symmetric"), ((8, True), (4, True), (4, False), (2, True)))
def test_torch_integer_path_turns_weights_into_int8_in_row_blocks(gen, monkeypatch, bits, symmetric):
    """Per-channel integer GEMMs on the CPU turn a block of weight rows into int8 at a time, into one
    reused buffer (the last block shorter): each block must meet its own rows' codes, scales, zero
    points and bias, whatever an earlier block left in the buffer."""
    from qdlm_export.kernels import weight_only

    monkeypatch.setattr(weight_only, "INT_BLOCK_MIN_ROWS", 1)
    monkeypatch.setattr(weight_only, "INT_BLOCK_BYTES", 48 * 192)  # 48 rows a block
    k, n_out = 192, 150
    assert [r.stop - r.start for r in weight_only.int_row_blocks(n_out, k, torch.device("cpu"))] == [48, 48, 48, 6]
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, -1, symmetric, torch.float32)
    bias = torch.randn(n_out, generator=gen)
    x_q = torch.randint(-127, 128, (2, 7, k), generator=gen, dtype=torch.int8)
    x_s = torch.rand(2, 7, 1, generator=gen) * 0.1 + 0.01
    y = packed_int_linear_torch(x_q, x_s, packed, scale, zero, bits, -1, k, bias, torch.float32)
    assert y.shape == (2, 7, n_out)
    ref = ref_linear(x_q.double() * x_s.double(), ref_weight(codes, scale, zero, bits, -1), bias)
    assert_close(y, *ref, RTOL[torch.float32], "blocked torch integer path")


# ---------------------------------------------------------------------------------------------
# Triton weight-only GEMM (interpreter)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("bits", BITS)
def test_weight_only_triton(gen, bits, symmetric, group):
    from qdlm_export.kernels.weight_only_triton import weight_only_linear_triton

    k = 100 if group == -1 else 2 * group  # K = 100: not a multiple of the 64-wide K step
    n_out = 80  # not a multiple of the 64/128-wide N tiles
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, symmetric, SCALE_DTYPES[(bits + group) % 3])
    w64 = ref_weight(codes, scale, zero, bits, group)
    for i, m in enumerate((1, 1000)):
        dtype = DTYPES[(bits + i + (group == -1)) % 3]
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n_out, generator=gen).to(dtype) if (m + bits) % 2 else None
        out = nan_buffer((m, n_out), dtype)
        y = weight_only_linear_triton(*on_dev(x, packed, scale, zero), bits, group, k, *on_dev(bias), out=out)
        assert y is out
        assert_close(y.cpu(), *ref_linear(x, w64, bias), RTOL[dtype], f"triton M={m} {dtype}")


@needs_triton
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_triton_matches_the_float64_weight(gen, bits, symmetric, group):
    """The one-pass Triton dequantization (the many-token CUDA path) against (q - z) * s in float64:
    exact in float32 (one rounding of a small integer times a float32 scale), one rounding in bf16."""
    from qdlm_export.kernels.weight_only_dequant_triton import dequantize_packed_triton

    k = 100 if group == -1 else 3 * group  # K = 100: a masked tail in the last K tile
    n_out = 72  # not a multiple of the 32-row tiles
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, symmetric, SCALE_DTYPES[(bits + group) % 3])
    w64 = ref_weight(codes, scale, zero, bits, group)
    out = nan_buffer((n_out, k), torch.float32)
    w = dequantize_packed_triton(*on_dev(packed, scale, zero), bits, group, k, torch.float32, out=out)
    assert w is out and torch.equal(w.cpu(), w64.float())
    w16 = dequantize_packed_triton(*on_dev(packed, scale, zero), bits, group, k, torch.bfloat16).cpu()
    # within one bf16 ulp: GPUs round to nearest, Triton's interpreter truncates
    assert w16.dtype == torch.bfloat16 and ((w16.double() - w64).abs() <= w64.abs() * 2**-7).all()


@needs_triton
@pytest.mark.parametrize("bits", (3, 4))
def test_triton_dequant_backend_through_dispatch(gen, bits):
    k, n_out, group = 256, 40, 64
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, False, torch.float16)
    x = torch.randn(3, 50, k, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    y = kernels.weight_only_linear(*on_dev(x, packed, scale, zero), bits, group, k, *on_dev(bias),
                                   backend="triton_dequant").cpu()
    assert y.shape == (3, 50, n_out) and y.dtype == torch.float32
    assert_close(y, *ref_linear(x, ref_weight(codes, scale, zero, bits, group), bias), RTOL[torch.float32], "dequant")


@needs_triton
@pytest.mark.parametrize("bits,group", [(4, 64), (3, -1), (8, 32)])
def test_weight_only_triton_split_k(gen, bits, group):
    """Split K (a tile's K steps shared by SPLIT_K programs, their float32 partials summed after):
    the same product, and the bias counted once."""
    from qdlm_export.kernels.weight_only_triton import pick_config, weight_only_linear_triton

    k = 100 if group == -1 else 5 * group  # 5 K steps over 2 or 4 splits: some splits get fewer
    n_out = 48
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, bits == 3, torch.float16)
    w64 = ref_weight(codes, scale, zero, bits, group)
    x = torch.randn(5, k, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    for split in (2, 4):
        cfg = {**pick_config(5, n_out, group, k), "BLOCK_K": 16 if group == -1 else min(group, 32), "SPLIT_K": split}
        out = nan_buffer((5, n_out), torch.float32)
        y = weight_only_linear_triton(*on_dev(x, packed, scale, zero), bits, group, k, *on_dev(bias), out=out, config=cfg)
        assert y is out
        assert_close(y.cpu(), *ref_linear(x, w64, bias), RTOL[torch.float32], f"split {split}")


@needs_triton
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 32, True), (2, -1, False), (8, -1, True)])
def test_weight_only_triton_swap_ab(gen, bits, group, symmetric):
    """SWAP_AB (the transposed tile, dequantized weight as the MMA's first operand): the same product
    against the float64 reference, with masked tails on every side, per group and per channel, with and
    without split K."""
    from qdlm_export.kernels.weight_only_triton import pick_config, weight_only_linear_triton

    k = 100 if group == -1 else 3 * group
    n_out, m = 40, 19  # tails in N and M for 16-row / 32-column tiles
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, symmetric, torch.bfloat16)
    w64 = ref_weight(codes, scale, zero, bits, group)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    for split in (1, 3):
        cfg = {**pick_config(m, n_out, group, k), "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16 if group == -1 else 32,
               "SPLIT_K": split, "SWAP_AB": True}
        out = nan_buffer((m, n_out), torch.float32)
        y = weight_only_linear_triton(*on_dev(x, packed, scale, zero), bits, group, k, *on_dev(bias), out=out, config=cfg)
        assert y is out
        assert_close(y.cpu(), *ref_linear(x, w64, bias), RTOL[torch.float32], f"swap, split {split}")


@needs_triton
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, -1, True), (3, 64, False), (2, -1, False)])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_weight_only_triton_offset_codes(gen, bits, group, symmetric, dtype):
    """OFFSET_CODES (codes as the exact floats base + q, the zero point and scale applied to each
    group's partial sum): the float64 product of the same x and W_hat, in both orientations, with and
    without split K, masked tails in M, N and K; the output's rounding is the only error."""
    from qdlm_export.kernels.weight_only_triton import pick_config, weight_only_linear_triton

    k = 100 if group == -1 else 3 * group
    n_out, m = 40, 19
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, symmetric, torch.float32)
    w64 = ref_weight(codes, scale, zero, bits, group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype)
    # two of the four orientation x split combinations per case (each is a compilation on a GPU)
    combos = ((False, 1), (True, 2)) if (bits + (dtype == torch.float16)) % 2 else ((True, 1), (False, 3))
    for swap, split in combos:
        cfg = {**pick_config(m, n_out, group, k), "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16 if group == -1 else 32,
               "SPLIT_K": split, "SWAP_AB": swap, "OFFSET_CODES": True}
        y = weight_only_linear_triton(*on_dev(x, packed, scale, zero), bits, group, k, *on_dev(bias), config=cfg)
        assert y.dtype == dtype
        assert_close(y.cpu(), *ref_linear(x, w64, bias), RTOL[dtype], f"swap {swap}, split {split}")


@needs_triton
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 64, True), (2, 32, False), (3, 32, True)])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_weight_only_triton_dequantizes_in_16_bits_exactly(gen, bits, group, symmetric, dtype):
    """Codes of up to 4 bits with a scale of the activations' own dtype are dequantized in that dtype,
    (base + q) - (base + z) times the scale: a small exact integer and one rounding, the float32
    path's. So the output equals, bit for bit, the same weight with its scales held in float32 (which
    takes the float32 path), in both orientations; and the float64 product within tolerance. (fp16:
    the interpreter computes it natively; its bf16 is raw bits, so bf16 runs upcast there, and the
    bf16 case is the GPU run's.)"""
    from qdlm_export.kernels.weight_only_triton import dequantizes_in_x, pick_config, weight_only_linear_triton

    k = 3 * group
    n_out, m = 40, 19
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, symmetric, dtype)
    assert dequantizes_in_x(dtype, bits, scale.dtype, k // group) and not dequantizes_in_x(dtype, bits, torch.float32, k // group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    for swap in (False, True):
        cfg = {**pick_config(m, n_out, group, k), "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16 if group == -1 else 32,
               "SWAP_AB": swap}
        y16 = weight_only_linear_triton(*on_dev(x, packed, scale, zero), bits, group, k, config=cfg)
        y32 = weight_only_linear_triton(*on_dev(x, packed, scale.float(), zero), bits, group, k, config=cfg)
        assert torch.equal(y16, y32), f"swap {swap}"
        assert_close(y16.cpu(), *ref_linear(x, ref_weight(codes, scale, zero, bits, group), None),
                     RTOL[dtype], f"swap {swap}")


@needs_triton
def test_weight_only_triton_offset_codes_refuses_what_it_cannot_hold(gen):
    from qdlm_export.kernels.weight_only_triton import pick_config, weight_only_linear_triton

    for bits, dtype in ((8, torch.bfloat16), (4, torch.float32)):
        codes, packed, scale, zero = random_packed_weight(gen, 32, 64, bits, 32, True)
        cfg = {**pick_config(4, 32, 32, 64), "OFFSET_CODES": True}
        with pytest.raises(ValueError, match="OFFSET_CODES needs bf16/fp16 activations and codes of at most 4 bits"):
            weight_only_linear_triton(*on_dev(torch.randn(4, 64).to(dtype), packed, scale, zero), bits, 32, 64,
                                      config=cfg)


@needs_triton
def test_weight_only_triton_configs_are_valid():
    """Every tile config the heuristic can pick: K steps inside one group, MMA-sized tiles."""
    from qdlm_export.kernels.weight_only_triton import pick_config

    for m in (1, 16, 17, 32, 33, 64, 65, 256, 257, 4096):
        for group in (16, 32, 48, 64, 96, 128, 256, -1):
            cfg = pick_config(m, 4096, group, 4096 if group == -1 else 16 * group)
            assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16
            assert group == -1 or group % cfg["BLOCK_K"] == 0, (m, group, cfg)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_triton_every_dtype_through_dispatch(gen, dtype):
    k, n_out, bits, group = 256, 40, 4, 128
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, False, torch.float16)
    x = torch.randn(2, 9, k, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype)
    y = kernels.weight_only_linear(*on_dev(x, packed, scale, zero), bits, group, k, *on_dev(bias), backend="triton").cpu()
    assert y.shape == (2, 9, n_out) and y.dtype == dtype
    assert_close(y, *ref_linear(x, ref_weight(codes, scale, zero, bits, group), bias), RTOL[dtype], "dispatch")


@needs_triton
def test_weight_only_triton_rejects_group_not_multiple_of_16():
    from qdlm_export.kernels.weight_only_triton import weight_only_linear_triton

    with pytest.raises(ValueError, match="multiple of 16"):
        weight_only_linear_triton(
            torch.randn(1, 40), torch.zeros(4, 5, dtype=torch.int32), torch.ones(4, 2), None, 4, 20, 40
        )


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_auto_uses_torch_on_cpu_even_with_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    b = kernels.select_backend("weight_only_linear", "cpu", K=4096, N=4096, bits=4, group_size=128, dtype=torch.bfloat16)
    # the native int4 kernel where it runs, else torch's packed CPU kernels; never the interpreter
    assert b.name == ("cpu_packed" if cpu_native.unavailable_reason() else "cpu_native")
    b = kernels.select_backend("weight_only_linear", "cpu", K=4096, N=4096, bits=3, group_size=128, dtype=torch.bfloat16)
    assert b.name == "torch"
    assert kernels.describe_backend(
        "weight_only_linear", "cpu", in_features=64, out_features=8, bits=4, group_size=-1
    ).startswith("torch")


@needs_triton
def test_env_var_forces_triton_and_torch(force_backend, gen):
    k, n_out = 64, 16
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, 4, -1, True, torch.float32)
    x = torch.randn(3, k, generator=gen)
    ref = ref_linear(x, ref_weight(codes, scale, zero, 4, -1), None)
    for choice in ("torch", "triton"):
        force_backend(choice)
        assert kernels.select_backend("weight_only_linear", DEV, K=k, N=n_out, bits=4, group_size=-1).family == choice
        y = kernels.weight_only_linear(*on_dev(x, packed, scale, zero), 4, -1, k).cpu()
        assert_close(y, *ref, RTOL[torch.float32], choice)


def test_forced_backend_that_cannot_run_raises(monkeypatch, force_backend):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    force_backend("triton")
    x = torch.randn(2, 64)
    with pytest.raises(kernels.KernelBackendError, match="QDLM_KERNEL_BACKEND=triton cannot run weight_only_linear"):
        kernels.weight_only_linear(x, torch.zeros(8, 8, dtype=torch.int32), torch.ones(8, 1), None, 4, -1, 64)
    assert kernels.describe_backend("weight_only_linear", "cpu", K=64, N=8, bits=4, group_size=-1).startswith("unavailable")
    force_backend("cuda-please")
    with pytest.raises(kernels.KernelBackendError, match="not a kernel backend"):
        kernels.weight_only_linear(x, torch.zeros(8, 8, dtype=torch.int32), torch.ones(8, 1), None, 4, -1, 64)


@needs_triton
def test_forced_triton_rejects_unsupported_shape():
    with pytest.raises(kernels.KernelBackendError, match="multiple of 16"):
        kernels.select_backend("weight_only_linear", DEV, backend="triton", K=40, N=8, bits=4, group_size=20)
    # auto falls back to torch for the same problem
    assert kernels.select_backend("weight_only_linear", DEV, K=40, N=8, bits=4, group_size=20).name == "torch"


def test_describe_backend_for_cuda_and_int8_ops():
    text = kernels.describe_backend(
        "weight_only_linear", "cuda", in_features=4096, out_features=12288, bits=3, group_size=128
    )
    assert text.startswith("triton" if HAS_TRITON else "torch")
    assert kernels.describe_backend("int8_gemm", "cpu", M=4, K=100, N=30).startswith("torch._int_mm")
    assert "more than 16 rows" in kernels.describe_backend("int8_gemm", "cuda", M=4, K=4096, N=4096)
    # on CUDA torch._int_mm can run M = 1024, but auto takes the (measured faster) Triton GEMM where it exists
    # weight-only: the fused kernel up to CUDA_FUSED_MAX_M tokens, dequantize + cuBLAS above (measured)
    from qdlm_export.kernels.weight_only import CUDA_FUSED_MAX_M

    facts = dict(in_features=4096, out_features=4096, bits=4, group_size=128, dtype=torch.bfloat16)
    few = kernels.describe_backend("weight_only_linear", "cuda", M=CUDA_FUSED_MAX_M, **facts)
    many = kernels.describe_backend("weight_only_linear", "cuda", M=CUDA_FUSED_MAX_M + 1, **facts)
    assert few.startswith("triton (" if HAS_TRITON else "torch (")
    assert many.startswith("triton_dequant (" if HAS_TRITON else "torch (")
    large = kernels.describe_backend("int8_gemm", "cuda", M=1024, K=4096, N=4096)
    assert large.startswith("triton (") if HAS_TRITON else large.startswith("torch._int_mm")
    two_steps = kernels.describe_backend("w4a4_linear", "cpu", in_features=4096, out_features=4096, bits=4, group_size=-1)
    assert "then" in two_steps
    assert set(kernels.backend_table()) == {
        "weight_only_linear",
        "quantize_per_token",
        "int8_gemm",
        "packed_int_linear",
        "hadamard",
        "grouped_expert_gemm",
    }
    with pytest.raises(kernels.KernelBackendError, match="unknown backend"):
        kernels.select_backend("int8_gemm", "cpu", backend="cutlass")


def test_backend_setting_is_read_once_until_refreshed(monkeypatch):
    assert registry.configured_backend() == "auto"
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert registry.configured_backend() == "auto"  # read once: forwards never look at the environment
    kernels.refresh_backend_setting()
    assert registry.configured_backend() == "torch"
    assert kernels.select_backend("int8_gemm", "cpu", M=4, K=64, N=8).name == "torch._int_mm"  # family torch
    monkeypatch.setenv(kernels.ENV_VAR, "gpu")
    kernels.refresh_backend_setting()
    with pytest.raises(kernels.KernelBackendError, match="not a kernel backend"):
        registry.configured_backend()
    assert kernels.describe_backend("int8_gemm", "cpu", M=4, K=64, N=8).startswith("unavailable")


def test_core_transforms_run_the_kernel_hadamard_only_on_gpu_or_when_forced(monkeypatch, force_backend, gen):
    """core may not import kernels: importing kernels plugs the dispatch into core.transforms. On CPU
    with ``auto`` the format's reference runs; a forced backend goes through the kernel op; without
    the hook (a process, or a self-contained checkpoint, without the kernels) the reference runs."""
    import qdlm_export.kernels.hadamard as kernel_hadamard

    calls = []
    real = kernel_hadamard.hadamard_transform

    def spy(x, *args, **kwargs):
        calls.append(x.shape[-1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(kernel_hadamard, "hadamard_transform", spy)
    x = torch.randn(3, 12 * 16, generator=gen, dtype=torch.float64)
    expect = x @ transforms.hadamard_matrix(12 * 16)
    torch.testing.assert_close(transforms.hadamard_transform(x), expect, rtol=1e-12, atol=1e-12)
    assert calls == []
    force_backend("torch")
    torch.testing.assert_close(transforms.hadamard_transform(x), expect, rtol=1e-12, atol=1e-12)
    assert calls == [12 * 16]
    try:
        transforms.set_hadamard_backend(None)
        torch.testing.assert_close(transforms.hadamard_transform(x), expect, rtol=1e-12, atol=1e-12)
        assert calls == [12 * 16]
    finally:
        transforms.set_hadamard_backend(kernel_hadamard.online_hadamard)


def test_import_does_not_need_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import qdlm_export.kernels as K, torch\n"
        "from qdlm_export.kernels import _triton\n"
        "_triton.triton_version.cache_clear()\n"
        "assert _triton.triton_unavailable_reason('cuda') is not None\n"
        "print(K.describe_backend('weight_only_linear', 'cuda', K=64, N=8, bits=4, group_size=-1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch")


# ---------------------------------------------------------------------------------------------
# Per-token activation quantization
# ---------------------------------------------------------------------------------------------


def ref_quantize(x, bits, clip=1.0):
    """float64 per-row symmetric quantization, ties away from zero; also flags near-ties (the
    kernels compute ``x * (1 / s)`` in float32: up to ~3 ulp of |v| <= 127 away from the exact)."""
    qmax = 2 ** (bits - 1) - 1
    x64 = x.double()
    s = x64.abs().amax(-1, keepdim=True) * clip / qmax
    v = torch.where(s > 0, x64 / s.clamp_min(1e-300), torch.zeros_like(x64))
    q = torch.floor(v.abs() + 0.5) * v.sign()
    frac = v.abs() - torch.floor(v.abs())
    near_tie = (frac - 0.5).abs() < 1e-4
    return q.clamp(-qmax, qmax), s, near_tie


def check_quantized(q, s, x, bits, what, clip=1.0):
    q_ref, s_ref, near_tie = ref_quantize(x, bits, clip)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.isfinite(s).all(), what
    assert torch.allclose(s.double(), s_ref, rtol=1e-6, atol=0), what
    diff = (q.double() - q_ref).abs()
    assert (diff <= near_tie.double()).all(), f"{what}: codes differ away from rounding ties"


@pytest.mark.parametrize("bits", (8, 4))
def test_quantize_per_token_torch(gen, bits):
    for shape, dtype in (((1, 5), torch.float32), ((1000, 300), torch.bfloat16), ((2, 3, 4097), torch.float16)):
        x = torch.randn(shape, generator=gen).to(dtype)
        x.view(-1, shape[-1])[-1] = 0  # an all-zero token
        q, s = quantize_per_token_torch(x, bits)
        assert q.shape == x.shape and s.shape == (*shape[:-1], 1)
        check_quantized(q, s, x, bits, f"torch {shape}")
        assert (s.view(-1)[-1] == 0) and (q.view(-1, shape[-1])[-1] == 0).all()


@needs_triton
@pytest.mark.parametrize("bits", (8, 4))
def test_quantize_per_token_triton(gen, bits):
    from qdlm_export.kernels.int8_triton import quantize_per_token_triton

    for shape, dtype in (((1, 5), torch.bfloat16), ((1000, 300), torch.float16), ((3, 4097), torch.float32)):
        x = torch.randn(shape, generator=gen).to(dtype) * 3
        x[-1] = 0
        clip = 1.0 if dtype != torch.float32 else 0.9  # clipping saturates the largest entries
        q = torch.full(shape, -128, dtype=torch.int8, device=DEV)  # -128 is never a valid code
        s = nan_buffer((*shape[:-1], 1), torch.float32)
        quantize_per_token_triton(x.to(DEV), bits, clip, out=(q, s))
        q, s = q.cpu(), s.cpu()
        check_quantized(q, s, x, bits, f"triton {shape}", clip)
        q_t, s_t = quantize_per_token_torch(x, bits, clip)
        assert torch.equal(q, q_t) and torch.equal(s, s_t), "triton and torch must agree bit for bit"


@pytest.mark.parametrize("bits", (8, 4))
def test_quantize_per_token_matches_the_loaders_fake_quantizer(gen, bits):
    """Codes must be the ones ``activations.py`` (the loader's fake quantization) produces."""
    backends = ["torch"] + (["triton"] if HAS_TRITON else [])
    for clip in (1.0, 0.85):
        spec = ActivationSpec(bits=bits, granularity="token", symmetric=True, clip_ratio=clip)
        # bf16: many exact ties; 3000 rows span two CPU chunks (CPU_QUANT_CHUNK_ELEMENTS)
        x = (torch.randn(3000, 96, generator=gen) * 2).to(torch.bfloat16)
        q_ref, s_ref, _ = activation_codes(x, spec)
        for backend in backends:
            q, s = kernels.quantize_per_token(x.to(DEV if backend == "triton" else "cpu"), bits, clip, backend=backend)
            q, s = q.cpu(), s.cpu()
            assert torch.equal(s, s_ref.float()), backend
            assert torch.equal(q, q_ref), f"{backend}: codes differ from activations.activation_codes"


# ---------------------------------------------------------------------------------------------
# int8 x int8 GEMM
# ---------------------------------------------------------------------------------------------


def int8_case(gen, m, k, n):
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    a_s = torch.rand(m, 1, generator=gen) * 0.01 + 1e-3
    b_s = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen)
    w64 = b.double() * b_s.double()[:, None]
    x = a.double() * a_s.double()
    return a, a_s, b, b_s, bias, x, w64


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (17, 100, 130), (1000, 64, 40)])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_int8_gemm_torch(gen, m, k, n, out_dtype):
    a, a_s, b, b_s, bias, x, w64 = int8_case(gen, m, k, n)
    y = int8_gemm_torch(a, a_s, b, b_s, bias, out_dtype)
    assert y.dtype == out_dtype
    assert_close(y, *ref_linear(x, w64, bias), RTOL[out_dtype], "torch int8")


@needs_triton
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (33, 100, 130), (1000, 160, 40)])
def test_int8_gemm_triton(gen, m, k, n):
    from qdlm_export.kernels.int8_triton import int8_gemm_triton

    a, a_s, b, b_s, bias, x, w64 = int8_case(gen, m, k, n)
    for out_dtype, with_bias in ((torch.float32, True), (torch.bfloat16, False), (torch.float16, True)):
        out = nan_buffer((m, n), out_dtype)
        bb = bias if with_bias else None
        int8_gemm_triton(*on_dev(a, a_s, b, b_s, bb), out_dtype, out=out)
        assert_close(out.cpu(), *ref_linear(x, w64, bb), RTOL[out_dtype], f"triton int8 {out_dtype}")


# ---------------------------------------------------------------------------------------------
# Integer activations x packed weights (W4A4, W8A8 on packed 8-bit)
# ---------------------------------------------------------------------------------------------


def packed_case(gen, m, k, n_out, bits, group, symmetric, act_bits):
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, bits, group, symmetric, torch.float16)
    qmax = 2 ** (act_bits - 1) - 1
    x_q = torch.randint(-qmax, qmax + 1, (m, k), generator=gen, dtype=torch.int8)
    x_s = torch.rand(m, 1, generator=gen) * 0.1 + 0.01
    return codes, packed, scale, zero, x_q, x_s


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("bits", BITS)
def test_packed_int_linear_torch(gen, bits, symmetric, group):
    k = 100 if group == -1 else 2 * group
    m, n_out = 37, 24
    codes, packed, scale, zero, x_q, x_s = packed_case(gen, m, k, n_out, bits, group, symmetric, 4)
    bias = torch.randn(n_out, generator=gen)
    y = packed_int_linear_torch(x_q, x_s, packed, scale, zero, bits, group, k, bias, torch.float32)
    ref = ref_linear(x_q.double() * x_s.double(), ref_weight(codes, scale, zero, bits, group), bias)
    assert_close(y, *ref, RTOL[torch.float32], "torch packed int")


@needs_triton
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("bits", BITS)
def test_packed_int_linear_triton(gen, bits, symmetric, group):
    from qdlm_export.kernels.int8_triton import packed_int_linear_triton

    if bits == 8 and not symmetric:
        with pytest.raises(ValueError, match="outside int8"):
            packed_int_linear_triton(
                torch.zeros(1, 64, dtype=torch.int8),
                torch.ones(1, 1),
                torch.zeros(8, 16, dtype=torch.int32),
                torch.ones(8, 1),
                torch.zeros(8, 1, dtype=torch.uint8),
                8,
                -1,
                64,
            )
        return
    k = 100 if group == -1 else 2 * group
    n_out = 72
    for m, act_bits, out_dtype in ((1, 4, torch.float32), (300, 8, torch.bfloat16)):
        codes, packed, scale, zero, x_q, x_s = packed_case(gen, m, k, n_out, bits, group, symmetric, act_bits)
        bias = torch.randn(n_out, generator=gen) if m > 1 else None
        out = nan_buffer((m, n_out), out_dtype)
        args = on_dev(x_q, x_s, packed, scale, zero)
        packed_int_linear_triton(*args, bits, group, k, *on_dev(bias), out_dtype, out=out)
        ref = ref_linear(x_q.double() * x_s.double(), ref_weight(codes, scale, zero, bits, group), bias)
        assert_close(out.cpu(), *ref, RTOL[out_dtype], f"triton packed int M={m}")


@needs_triton
def test_packed_w8a8_runs_the_tuned_int8_gemm_on_the_codes(gen, monkeypatch):
    """A checkpoint's symmetric per-channel 8-bit weight (what a loaded W8A8 model multiplies) goes
    through the int8 GEMM kernel on its uint8 codes (top bit flipped in the kernel), not the
    unpack-per-tile kernel; rows whose bytes are padded (K = 100 is 25 words) included."""
    import qdlm_export.kernels.int8_triton as it

    calls = []
    real = it._int8_gemm_kernel

    class Spy:  # the kernel launched, and the dtype of its weight operand
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append(a[1].dtype) or real[grid](*a, **kw)

    monkeypatch.setattr(it, "_int8_gemm_kernel", Spy())
    for k in (100, 256):
        codes, packed, scale, zero, x_q, x_s = packed_case(gen, 19, k, 40, 8, -1, True, 8)
        y = it.packed_int_linear_triton(*on_dev(x_q, x_s, packed, scale, zero), 8, -1, k, None, torch.float32)
        ref = ref_linear(x_q.double() * x_s.double(), ref_weight(codes, scale, zero, 8, -1), None)
        assert_close(y.cpu(), *ref, RTOL[torch.float32], f"W8A8 codes K={k}")
    assert calls == [torch.uint8, torch.uint8]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_w4a4_and_w8a8_linear_end_to_end(gen, backend):
    k, n_out, group = 256, 48, -1
    codes, packed, scale, zero = random_packed_weight(gen, n_out, k, 4, group, True, torch.bfloat16)
    x = torch.randn(3, 5, k, generator=gen).to(torch.bfloat16)
    dev = DEV if backend == "triton" else torch.device("cpu")
    y = kernels.w4a4_linear(x.to(dev), packed.to(dev), scale.to(dev), zero, group, k, backend=backend).cpu()
    x_q, x_s = (t.cpu() for t in kernels.quantize_per_token(x.to(dev), 4, backend=backend))
    assert y.shape == (3, 5, n_out) and y.dtype == torch.bfloat16
    w64 = ref_weight(codes, scale, zero, 4, group)
    # The composition is exactly quantize-then-GEMM; the GEMM matches float64 on those codes.
    ref = ref_linear(x_q.double() * x_s.double(), w64, None)
    assert_close(y, *ref, RTOL[torch.bfloat16], "w4a4")
    # W8A8 with a per-channel int8 weight.
    w_q = torch.randint(-127, 128, (n_out, k), generator=gen, dtype=torch.int8)
    w_s = torch.rand(n_out, generator=gen) * 0.01
    y8 = kernels.w8a8_linear(x.to(dev), w_q.to(dev), w_s.to(dev), backend=backend).cpu()
    x_q8, x_s8 = (t.cpu() for t in kernels.quantize_per_token(x.to(dev), 8, backend=backend))
    ref8 = ref_linear(x_q8.double() * x_s8.double(), w_q.double() * w_s.double()[:, None], None)
    assert_close(y8, *ref8, RTOL[torch.bfloat16], "w8a8")
    # and int8 activations really approximate x: the quantization error is a few percent of |x||w|
    exact, mag = ref_linear(x, w_q.double() * w_s.double()[:, None], None)
    assert ((y8.double() - exact).abs() <= 0.02 * mag).all()
