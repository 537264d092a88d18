"""The packed CPU weight-only backend (kernels/cpu_packed.py) against the float64 dequantized reference.

Tolerances. The backend rounds the activations to bf16 (the tests feed bf16 activations, so that
rounding is shared with the reference), uses the scales in bf16 (relative error <= 2**-9 each),
rounds the dequantized weights to bf16 on the many-token path (<= 2**-9 each), accumulates in
float32 and rounds the output to bf16 (<= 2**-9 of |y|). Each output element therefore differs from
the float64 product by at most about 3 * 2**-9 * sum_k |x_k| |w_k|; the tests allow 2**-6 of that sum
(a margin of ~2.7x) and 1 % relative Frobenius error. A wrong code, zero point, group or scale
layout gives errors of the order of |y| itself, far outside both bounds.
"""

from __future__ import annotations

import pytest
import torch

from qdlm_export import kernels
from qdlm_export.core.packing import pack_rows
from qdlm_export.kernels import cpu_packed as C
from qdlm_export.kernels.weight_only import dequantize_packed, weight_only_linear_torch
from tests.kernel_inputs import random_packed_weight

pytestmark = [
    pytest.mark.skipif(C.unsupported_reason() is not None, reason=str(C.unsupported_reason())),
    # torch's kernels themselves: the native int4 kernels (test_kernels_cpu_native.py) rank above them
    pytest.mark.usefixtures("native_off"),
]


def _check(y, x, wp, scale, zp, bits, group_size, k, bias=None):
    # the float64 reference: the torch backend dequantizes exactly and multiplies in x's dtype
    ref = weight_only_linear_torch(x.double(), wp, scale, zp, bits, group_size, k, bias)
    w = dequantize_packed(wp, scale, zp, bits, group_size, k, torch.float64)
    magnitude = x.double().abs().reshape(-1, k) @ w.abs().T  # sum_k |x_k| |w_k|
    err = (y.double() - ref).reshape(-1, w.shape[0]).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.all(err <= 2**-6 * magnitude + 1e-6), f"max excess {(err - 2**-6 * magnitude).max().item()}"
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


CASES = [
    # bits, K, N, group, symmetric
    (4, 256, 48, 32, True),
    (4, 256, 64, 64, False),
    (4, 512, 32, 128, True),
    (4, 512, 80, 128, False),
    (4, 512, 32, 256, False),
    (4, 1024, 16, 512, True),  # a multiple of 256: scales repeated for the kernel
    (4, 384, 32, -1, False),  # per channel: 384 = 3 * 128
    (8, 256, 40, -1, True),
    (8, 320, 24, -1, True),
]


@pytest.mark.parametrize("bits,k,n,group_size,symmetric", CASES)
@pytest.mark.parametrize("path", ["packed", "dequant"])
def test_cpu_packed_matches_float64_reference(monkeypatch, bits, k, n, group_size, symmetric, path):
    gen = torch.Generator().manual_seed(hash((bits, k, n, group_size, symmetric, path)) % 2**31)
    if path == "dequant":  # blocks of 16 output rows: several per weight, the last one partial where N % 16
        monkeypatch.setattr(C, "DEQUANT_BLOCK_BYTES", 2 * k * 16)
    _, wp, scale, zp = random_packed_weight(gen, n, k, bits, group_size, symmetric)
    bias = torch.randn(n, generator=gen)
    for m in (1, 5, 33):
        x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16)
        y = C.weight_only_linear_cpu(x, wp, scale, zp, bits, group_size, k, bias, path=path)
        _check(y, x, wp, scale, zp, bits, group_size, k, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_packed_other_activation_dtypes_come_back_in_their_dtype(dtype):
    gen = torch.Generator().manual_seed(7)
    _, wp, scale, zp = random_packed_weight(gen, 32, 256, 4, 128, False, scale_dtype=torch.bfloat16)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16).to(dtype)  # bf16-representable values
    y = C.weight_only_linear_cpu(x, wp, scale, zp, 4, 128, 256)
    _check(y, x, wp, scale, zp, 4, 128, 256)


@pytest.mark.parametrize("bits,k,n,group_size,symmetric", [c for c in CASES if c[0] == 4])
def test_repacked_int4_weights_decode_to_our_codes(bits, k, n, group_size, symmetric):
    """The kernel itself reads the repacked weight back: float32 identity activations and scale 1,
    zero 8 give exactly q (small integers are exact in float32)."""
    gen = torch.Generator().manual_seed(k * n + group_size)
    codes, wp, scale, zp = random_packed_weight(gen, n, k, bits, group_size, symmetric)
    p = C.repack(wp, scale, zp, bits, group_size, k)
    assert p.weight.dtype == torch.uint8 and tuple(p.weight.shape) == (n, k // 2)
    unit = torch.zeros(k // p.kernel_group, n, 2)
    unit[..., 0] = 1.0
    unit[..., 1] = 8.0
    decoded = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), p.weight, p.kernel_group, unit)
    assert torch.equal(decoded.T, codes.to(torch.float32))


def test_repacked_int8_weights_are_our_codes_minus_128():
    gen = torch.Generator().manual_seed(3)
    codes, wp, scale, _ = random_packed_weight(gen, 24, 96, 8, -1, True)
    p = C.repack(wp, scale, None, 8, -1, 96)
    assert torch.equal(p.weight.to(torch.int16) + 128, codes.to(torch.int16))
    assert torch.equal(p.scales, scale.reshape(-1).to(torch.bfloat16))


def test_repack_happens_once_and_follows_in_place_changes():
    gen = torch.Generator().manual_seed(11)
    _, wp, scale, _ = random_packed_weight(gen, 32, 256, 4, 128, True)
    first = C.prepare(wp, scale, None, 4, 128, 256)
    assert C.prepare(wp, scale, None, 4, 128, 256) is first  # cached: no second repack
    x = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    C.weight_only_linear_cpu(x, wp, scale, None, 4, 128, 256)
    assert C.prepare(wp, scale, None, 4, 128, 256) is first
    new_codes = torch.randint(0, 16, (32, 256), generator=gen, dtype=torch.uint8)
    wp.copy_(pack_rows(new_codes, 4))  # in place: same tensor object, new version
    y = C.weight_only_linear_cpu(x, wp, scale, None, 4, 128, 256)
    assert C.prepare(wp, scale, None, 4, 128, 256) is not first
    _check(y, x, wp, scale, None, 4, 128, 256)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, -1)])
def test_many_token_calls_never_make_the_cpu_layout(bits, group_size):
    """The dequantized path reads the checkpoint's words: only the kernel's scales are cached, so a
    model that never runs few tokens holds no second copy of its codes; the first few-token call
    adds the CPU layout to the same cache entry."""
    gen = torch.Generator().manual_seed(19 + bits)
    k, n = 256, 48
    _, wp, scale, _ = random_packed_weight(gen, n, k, bits, group_size, True)
    many = torch.randn(C.PACKED_MAX_M[bits] + 1, k, generator=gen).to(torch.bfloat16)
    y = C.weight_only_linear_cpu(many, wp, scale, None, bits, group_size, k)
    _check(y, many, wp, scale, None, bits, group_size, k)
    cached = C._CACHE.get(wp)
    assert cached is not None and cached.weight is None
    assert cached.nbytes == cached.scales.numel() * 2  # bf16 scales only
    few = many[:3]
    y = C.weight_only_linear_cpu(few, wp, scale, None, bits, group_size, k)
    _check(y, few, wp, scale, None, bits, group_size, k)
    cached = C._CACHE.get(wp)
    assert cached.weight is not None and cached.weight.numel() * cached.weight.element_size() == n * k * bits // 8
    y = C.weight_only_linear_cpu(many, wp, scale, None, bits, group_size, k)  # reuses the entry
    assert C._CACHE.get(wp) is cached
    _check(y, many, wp, scale, None, bits, group_size, k)


def test_rule_switches_path_by_token_count():
    for bits, limit in C.PACKED_MAX_M.items():
        assert C.use_packed(bits, 1) and C.use_packed(bits, limit) and not C.use_packed(bits, limit + 1)


def test_dispatch_picks_cpu_packed_for_bf16_only_and_says_why_not():
    shapes = dict(K=4096, N=4096, bits=4, group_size=128, symmetric=True)
    assert kernels.select_backend("weight_only_linear", "cpu", dtype=torch.bfloat16, **shapes).name == "cpu_packed"
    assert kernels.select_backend("weight_only_linear", "cpu", dtype=torch.float32, **shapes).name == "torch"
    assert kernels.select_backend("weight_only_linear", "cpu", "torch", dtype=torch.bfloat16, **shapes).name == "torch"
    text = kernels.describe_backend("weight_only_linear", "cpu", "cpu_packed", in_features=4096, out_features=4096, bits=3, group_size=128)
    assert "3-bit" in text
    text = kernels.describe_backend("weight_only_linear", "cpu", "cpu_packed", in_features=4096, out_features=40, bits=4, group_size=128)
    assert "multiple of 16" in text
    text = kernels.describe_backend(
        "weight_only_linear", "cpu", "cpu_packed", in_features=4096, out_features=64, bits=8, group_size=128, symmetric=True
    )
    assert "per-channel" in text


def test_dispatch_weight_only_linear_runs_cpu_packed_on_bf16():
    gen = torch.Generator().manual_seed(5)
    _, wp, scale, zp = random_packed_weight(gen, 48, 256, 4, 64, False)
    x = torch.randn(6, 256, generator=gen).to(torch.bfloat16)
    y = kernels.weight_only_linear(x, wp, scale, zp, 4, 64, 256)
    _check(y, x, wp, scale, zp, 4, 64, 256)
    assert C.prepare(wp, scale, zp, 4, 64, 256) is C._CACHE.get(wp)  # the call cached its repack


def test_prepare_module_repacks_qdlm_linears_at_load_time(tiny_llada, tmp_path):
    from qdlm_export.loader.hf_quantizer import QdlmLinear
    from qdlm_export.quantize.api import make_config, quantize

    out = tmp_path / "w4"
    quantize(str(tiny_llada), out, make_config("rtn", bits=4, group_size=64), trust_remote_code=True, verify=False)
    import transformers

    model = transformers.AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, QdlmLinear)]
    assert linears
    assert C.prepare_module(model, dtype=torch.float32) == 0  # float32 models stay on the exact path
    assert C.prepare_module(model, dtype=model.dtype) == len(linears)
    for m in linears:
        assert C._CACHE.get(m.weight_packed) is not None
