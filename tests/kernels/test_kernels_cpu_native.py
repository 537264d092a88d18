"""The native AVX512-BF16 int4 kernels (kernels/cpu_native.py, native/int4_avx512bf16.c) against the
float64 dequantized reference of the project's torch backend (``dequantize_packed``).

Tolerances. The fused kernel takes the bf16 activations as they are, the codes exactly (small
integers are exact in bf16), sums in float32 and applies float32 scales, then rounds the output to
bf16 (<= 2**-9 |y|): its error bound is 2**-8 |y| plus float32 summation noise, far below 2**-12 of
sum_k |x_k||w_k|. The blocked (many-token) kernel also rounds W_hat to bf16 (<= 2**-9 each), so its
bound is 2**-8 of that sum; against x @ bf16(W_hat).T only float32 summation and the output's bf16
rounding remain. The AMX codes-on-tiles kernel is bounded as the fused one: its codes are exact
(128 + q) and its offset of 128 cancels in float32, typically about 2**-17 of the magnitude.
A wrong code, pair order, zero point, group or transpose gives errors of the order
of |y| itself.

The build, its cache and its refusals are tested on any machine; the arithmetic only where the
kernels run (a CPU with AVX512-BF16 and a C compiler).
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from qdlm_export import kernels
from qdlm_export.kernels import cpu_native as N
from qdlm_export.kernels import native_build
from qdlm_export.kernels.weight_only import dequantize_packed
from tests.kernel_inputs import random_packed_weight

needs_native = pytest.mark.skipif(N.unavailable_reason() is not None, reason=str(N.unavailable_reason()))


def _reference(x, wp, scale, zp, group_size, k):
    w = dequantize_packed(wp, scale, zp, 4, group_size, k, torch.float64)
    return x.double().reshape(-1, k) @ w.T, x.double().abs().reshape(-1, k) @ w.abs().T


def _check(y, x, wp, scale, zp, group_size, k, *, kernel, bias=None):
    ref, magnitude = _reference(x, wp, scale, zp, group_size, k)
    size = ref.abs()
    if bias is not None:  # the bias is added in bf16: one more rounding of it and of the sum
        ref = ref + bias.double()
        size = size + ref.abs() + bias.double().abs()
    err = (y.double().reshape(ref.shape) - ref).abs()
    bound = 2**-8 * (size + magnitude) if kernel == "blocked" else 2**-8 * size + 2**-12 * magnitude
    assert torch.all(err <= bound + 1e-7), f"max excess {(err - bound).max().item()}"


def _auto(m: int) -> str:
    """The kernel the backend's own rule (no ``kernel=`` given) runs for ``m`` tokens."""
    return N.pick_kernel(m)


def _runnable(kernel: str) -> None:
    if kernel == "amx_codes" and not N.amx_available():
        pytest.skip("this CPU (or its kernel) gives no AMX tiles")


CASES = [
    # K, N, group, symmetric
    (128, 16, 32, True),
    (256, 48, 64, False),
    (384, 32, 128, False),
    (512, 80, 256, True),
    (384, 32, -1, False),  # per channel, 3 chunks of 128
    (1024, 64, 512, False),  # a group spanning several chunks
]


@needs_native
@pytest.mark.parametrize("k,n,group_size,symmetric", CASES)
@pytest.mark.parametrize("kernel", N.KERNELS)
def test_native_matches_float64_reference(gen, k, n, group_size, symmetric, kernel):
    _runnable(kernel)
    _, wp, scale, zp = random_packed_weight(gen, n, k, 4, group_size, symmetric)
    bias = torch.randn(n, generator=gen)
    for m in (1, 3, 16, 17, 40):  # one partial token block, a full one, and full + partial ones
        x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16)
        y = N.weight_only_linear_native(x, wp, scale, zp, 4, group_size, k, kernel=kernel)
        assert y.dtype == torch.bfloat16 and y.shape == (2, m, n)
        _check(y, x, wp, scale, zp, group_size, k, kernel=kernel)
        with_bias = N.weight_only_linear_native(x, wp, scale, zp, 4, group_size, k, bias, kernel=kernel)
        _check(with_bias, x, wp, scale, zp, group_size, k, kernel=kernel, bias=bias)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_native_other_activation_dtypes_come_back_in_their_dtype(gen, dtype):
    _, wp, scale, zp = random_packed_weight(gen, 32, 256, 4, 128, False, scale_dtype=torch.bfloat16)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16).to(dtype)  # bf16-representable values
    y = N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 256)
    assert y.dtype == dtype
    _check(y, x, wp, scale, zp, 128, 256, kernel=_auto(5))


def _bf16_w_hat(codes, scales, group, k):
    """W_hat as the blocked kernel holds it: the float32 ``q * s - zs`` (exact in float64, then one
    rounding, as a fused multiply-subtract gives), rounded to nearest-even bf16."""
    return N.reference_dequant(codes, scales, group, k).to(torch.float32).to(torch.bfloat16).to(torch.float64)


@needs_native
@pytest.mark.parametrize("unit", ["avx512", "amx"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n,group", [(1152, 784, 128), (1536, 48, 1536)])
def test_blocked_kernel_is_x_times_bf16_w_hat(gen, monkeypatch, unit, threads, k, n, group):
    """Against float64 x @ bf16(W_hat).T the blocked kernel differs by float32 summation and the output
    rounding only, across its block edges: K = 1152 (slabs of 512, 512 and 128 inputs), N = 784 (one
    thread: a 768-output block, then a one-tile panel; two: shares of 384 and 400 outputs; on AMX tiles
    blocks of 256 outputs), one group
    spanning three slabs (per channel, K = 1536), M up to 200 (more than one chunk of token blocks,
    blocks of unequal size), and rows 64 bytes wider than K/2. On the AVX-512 loop and, where the CPU
    has it, on AMX tiles (M = 15 and 200: a zero-padded last block of 32 tokens)."""
    if unit == "amx" and not N.amx_available():
        pytest.skip("this CPU (or its kernel) gives no AMX tiles")
    if unit == "avx512":
        monkeypatch.setenv(N.AMX_SWITCH, "0")
    _, wp, scale, zp = random_packed_weight(gen, n, k, 4, group, False)
    wide = torch.randint(0, 256, (n, k // 2 + 64), generator=gen, dtype=torch.uint8)
    wide[:, : k // 2] = wp.view(torch.uint8)
    scales = N.native_scales(scale, zp)
    ref_w = dequantize_packed(wp, scale, zp, 4, group, k, torch.float64)
    assert torch.allclose(N.reference_dequant(wide, scales, group, k), ref_w, rtol=1e-6, atol=1e-9)
    w16 = _bf16_w_hat(wide, scales, group, k)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (1, 15, 200):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            y = N.blocked_gemm(x, wide, scales, group).double()
            want = x.double() @ w16.T
            bound = 2**-8 * want.abs() + 2**-14 * (x.double().abs() @ w16.abs().T)
            assert torch.all((y - want).abs() <= bound), f"M={m}: max excess {((y - want).abs() - bound).max()}"
    finally:
        torch.set_num_threads(before)


@needs_native
def test_long_prompts_run_in_chunks_with_the_same_result(gen, monkeypatch):
    _, wp, scale, zp = random_packed_weight(gen, 64, 256, 4, 128, True)
    codes, scales = wp.view(torch.uint8), N.native_scales(scale, zp)
    x = torch.randn(100, 256, generator=gen).to(torch.bfloat16)
    whole = N.blocked_gemm(x, codes, scales, 128)
    monkeypatch.setattr(N, "BLOCKED_MAX_M", 28)  # chunks of 28, 28, 28, 16 tokens
    assert torch.equal(N.blocked_gemm(x, codes, scales, 128), whole)


@needs_native
def test_fused_kernel_reads_a_wider_row_stride(gen):
    k, n = 256, 32
    codes = torch.randint(0, 256, (n, k // 2 + 16), generator=gen, dtype=torch.uint8)
    scales = torch.rand(2, k // 128, n, generator=gen)
    x = torch.randn(7, k, generator=gen).to(torch.bfloat16)
    y = N.gemm(x, codes, scales, 128)
    ref = N.reference_gemm(x, codes, scales, 128)
    assert torch.all((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-4 * (x.double().abs().sum(1, keepdim=True)))


@needs_native
def test_threads_split_work_without_changing_a_bit(gen):
    _, wp, scale, zp = random_packed_weight(gen, 256, 512, 4, 128, False)
    x = torch.randn(40, 512, generator=gen).to(torch.bfloat16)
    kernels_here = [f for f in N.KERNELS if f != "amx_codes" or N.amx_available()]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 512, kernel=f) for f in kernels_here]
        torch.set_num_threads(2)
        two = [N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 512, kernel=f) for f in kernels_here]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_native
def test_scales_are_cached_once_and_follow_in_place_changes(gen):
    _, wp, scale, zp = random_packed_weight(gen, 32, 256, 4, 128, False)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 256)
    first = N.prepare(wp, scale, zp, 128, 256)
    assert N.prepare(wp, scale, zp, 128, 256) is first
    assert N.cached_nbytes(wp) == 2 * 2 * 32 * 4  # float32 s and z*s, 2 groups x 32 outputs
    scale.mul_(2)  # in place: same tensor, new version
    y = N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 256)
    assert N.prepare(wp, scale, zp, 128, 256) is not first
    _check(y, x, wp, scale, zp, 128, 256, kernel=_auto(3))


@needs_native
def test_dispatch_picks_cpu_native_for_bf16_4bit_and_falls_back_for_the_rest(gen):
    pick = lambda **kw: kernels.select_backend("weight_only_linear", "cpu", **kw).name  # noqa: E731
    base = dict(K=4096, N=4096, bits=4, group_size=128, symmetric=True, dtype=torch.bfloat16)
    assert pick(**base) == "cpu_native"
    assert pick(**{**base, "dtype": torch.float32}) == "torch"  # float32 models keep the exact path
    assert pick(**{**base, "bits": 8, "group_size": -1}) == "cpu_packed"
    assert pick(**{**base, "K": 320, "group_size": 32}) == "cpu_packed"  # K not a multiple of 128
    text = kernels.describe_backend("weight_only_linear", "cpu", "cpu_native", in_features=320, out_features=64,
                                    bits=4, group_size=32)
    assert "multiple of 128" in text
    _, wp, scale, zp = random_packed_weight(gen, 48, 256, 4, 64, False)
    x = torch.randn(6, 256, generator=gen).to(torch.bfloat16)
    y = kernels.weight_only_linear(x, wp, scale, zp, 4, 64, 256)
    _check(y, x, wp, scale, zp, 64, 256, kernel=_auto(6))
    assert N.cached_nbytes(wp) > 0  # the call went through the native backend


def test_shape_rules_say_what_is_missing():
    assert N.shape_unsupported_reason(in_features=4096, out_features=4096, group_size=128) is None
    for group in (384, 0, -128):  # 384 does not divide 640; 0 and -128 are no group sizes
        assert "does not divide" in N.shape_unsupported_reason(in_features=640, out_features=64, group_size=group)
    assert "multiple of 16" in N.shape_unsupported_reason(in_features=4096, out_features=40, group_size=128)
    assert "multiple of 128" in N.shape_unsupported_reason(in_features=4160, out_features=64, group_size=64)
    assert "group_size 96" in N.shape_unsupported_reason(in_features=4224, out_features=64, group_size=96)
    assert N.unsupported_reason(bits=3).startswith("3-bit")


def test_switch_turns_the_native_kernels_off(rebuild, monkeypatch):
    monkeypatch.setenv(N.SWITCH, "0")
    assert N.library() is None
    assert N.SWITCH in N.unavailable_reason()
    assert "cpu_native" not in [b.name for b in kernels.backends_for("weight_only_linear")
                                if b.unsupported(kernels.Problem("weight_only_linear", torch.device("cpu"),
                                                                 dict(bits=4, K=4096, N=4096, group_size=128))) is None]


def test_a_failing_compiler_is_reported_and_leaves_nothing_behind(rebuild, monkeypatch):
    fake = rebuild / "fakecc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fakecc 1.0; exit 0; fi\n"
                    "echo 'int4.c:1: error: no AVX-512 here' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    assert N.library() is None
    reason = N.unavailable_reason()
    assert "failed" in reason and "error: no AVX-512 here" in reason
    assert os.listdir(rebuild / "cache" / "kernels") == []  # the staged file is gone


def test_missing_compiler_is_reported(rebuild, monkeypatch):
    monkeypatch.setattr(native_build, "_compiler", lambda: None)
    assert N.library() is None
    assert "no C compiler" in N.unavailable_reason()


@needs_native
def test_build_is_cached_under_a_content_name(rebuild):
    assert N.library() is not None
    built = list((rebuild / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith(native_build.SOURCE.stem + "-") and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    N.forget_library()
    assert N.library() is not None  # loaded again, not rebuilt
    assert list((rebuild / "cache" / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == mtime


def test_without_its_c_source_the_module_builds_nothing(rebuild, monkeypatch):
    """As copied into a self-contained checkpoint (no C file beside it): unavailable, no compiler run."""
    monkeypatch.setattr(native_build, "SOURCE", rebuild / "absent" / native_build.SOURCE.name)
    monkeypatch.setattr(native_build, "_compiler", lambda: pytest.fail("no compiler may run without the source"))
    assert N.library() is None
    assert "not installed" in N.unavailable_reason()


def test_a_cache_others_can_write_is_not_used(rebuild):
    """A cache folder writable by others (who could plant a library under the predictable name) is
    neither loaded from nor written: the library is built in a private temporary folder for this
    process, or the failure is reported, never raised."""
    cache = rebuild / "cache" / "kernels"
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    lib = N.library()
    assert (lib is not None) == (N.unavailable_reason() is None)
    assert list(cache.iterdir()) == []


@needs_native
def test_tensors_off_the_cpu_are_refused_not_read(gen):
    _, wp, scale, zp = random_packed_weight(gen, 32, 256, 4, 128, False)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="CPU tensors"):
        N.weight_only_linear_native(x, wp, scale.to("meta"), zp, 4, 128, 256)
    with pytest.raises(ValueError, match="CPU tensors"):
        N.gemm(x.to("meta"), wp.view(torch.uint8), N.native_scales(scale, zp), 128)
    with pytest.raises(ValueError, match="CPU tensors"):
        N.blocked_gemm(x, wp.view(torch.uint8).to("meta"), N.native_scales(scale, zp), 128)


@needs_native
def test_float32_bias_is_added_in_float32(gen):
    _, wp, scale, zp = random_packed_weight(gen, 32, 256, 4, 128, True)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16).float()
    bias = torch.randn(32, generator=gen) * 1000 + 0.123456
    y0 = N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 256)
    y = N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 256, bias)
    assert torch.equal(y, y0 + bias)


@needs_native
def test_a_forked_child_computes_with_threads(gen):
    """The helper threads do not survive a fork: the child makes its own pool instead of waiting
    forever on the parent's."""
    import multiprocessing

    _, wp, scale, zp = random_packed_weight(gen, 256, 512, 4, 128, False)
    x = torch.randn(4, 512, generator=gen).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 512)  # the parent's pool exists now
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_child_linear, (x, wp, scale, zp)).get(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


def _child_linear(x, wp, scale, zp):
    torch.set_num_threads(2)
    return N.weight_only_linear_native(x, wp, scale, zp, 4, 128, 512)


@needs_native
def test_the_rule_picks_by_token_count_and_amx(gen, monkeypatch):
    """Without AMX: the fused kernel up to NATIVE_MAX_M tokens, the blocked one above; with AMX the
    codes on the tiles up to AMX_CODES_MAX_M tokens, the blocked kernel (on tiles) above."""
    _, wp, scale, zp = random_packed_weight(gen, 32, 256, 4, 128, True)
    codes, scales = wp.view(torch.uint8), N.native_scales(scale, zp)
    calls = []
    for name in ("gemm", "blocked_gemm", "amx_codes_gemm"):
        monkeypatch.setattr(N, name, lambda *a, name=name: calls.append(name) or torch.zeros(a[0].shape[0], 32))
    sizes = (1, N.NATIVE_MAX_M, N.NATIVE_MAX_M + 1, N.AMX_CODES_MAX_M, N.AMX_CODES_MAX_M + 1)
    for m in sizes:
        N.linear(torch.zeros(m, 256, dtype=torch.bfloat16), codes, scales, 128)
    if N.amx_available():
        assert calls == ["amx_codes_gemm"] * 4 + ["blocked_gemm"]
    else:
        assert calls == ["gemm"] * 2 + ["blocked_gemm"] * 3
    monkeypatch.setenv(N.AMX_SWITCH, "0")
    calls.clear()
    for m in sizes:
        N.linear(torch.zeros(m, 256, dtype=torch.bfloat16), codes, scales, 128)
    assert calls == ["gemm"] * 2 + ["blocked_gemm"] * 3
    with pytest.raises(ValueError, match="not a native kernel"):
        N.linear(torch.zeros(1, 256, dtype=torch.bfloat16), codes, scales, 128, kernel="fast")


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_codes_kernel_across_its_edges(gen, threads):
    """The codes-on-tiles kernel against float64 over its edges: token counts around its tiles of 16
    and pairs of tiles (1, 16, 17, 33, 130), groups of 32 (a group per step), 128 (4 steps, one
    batch), 256 and per channel (a group spanning several batches), a last block of 16 outputs (N = 80;
    N = 112 on two threads: the second share starts 16 outputs into a block of 32), rows
    wider than K/2, and asymmetric zero points near the 128 offset's cancellation (x with a large
    common mean)."""
    if not N.amx_available():
        pytest.skip("this CPU (or its kernel) gives no AMX tiles")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, n, group in ((256, 80, 32), (512, 112, 128), (768, 32, 256), (384, 64, 384)):
            _, wp, scale, zp = random_packed_weight(gen, n, k, 4, group, False)
            wide = torch.randint(0, 256, (n, k // 2 + 16), generator=gen, dtype=torch.uint8)
            wide[:, : k // 2] = wp.view(torch.uint8)
            scales = N.native_scales(scale, zp)
            for m in (1, 16, 17, 33, 130):
                x = (torch.randn(m, k, generator=gen) + 3.0).to(torch.bfloat16)
                y = N.amx_codes_gemm(x, wide, scales, group).double()
                ref = N.reference_gemm(x, wide, scales, group)
                bound = 2**-8 * ref.abs() + 2**-12 * (x.double().abs() @ N.reference_dequant(wide, scales, group, k).abs().T)
                assert torch.all((y - ref).abs() <= bound), f"K={k} group={group} M={m}: max excess {((y - ref).abs() - bound).max()}"
    finally:
        torch.set_num_threads(before)


class _Wrapper(torch.Tensor):
    """A wrapper tensor subclass as torchao builds them: no storage of its own, its data in an inner tensor."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} is not needed by these tests")


def test_eviction_reaches_every_allocation_once_and_the_inner_tensors_of_wrappers(monkeypatch):
    """The cold-weight benchmark's eviction: a view evicts its whole allocation, a wrapper subclass its
    inner tensors, empty tensors nothing."""
    calls = []

    class FakeLibrary:
        def qdlm_evict(self, pointer, nbytes):
            calls.append((pointer, nbytes))

    monkeypatch.setattr(N, "library", lambda: FakeLibrary())
    base, inner = torch.randn(64, 8), torch.randn(32)
    assert N.evict_from_caches([base[3:5], _Wrapper(inner), torch.empty(0)])
    assert calls == [(base.data_ptr(), base.numel() * 4), (inner.data_ptr(), inner.numel() * 4)]
    monkeypatch.setattr(N, "library", lambda: None)
    assert N.evict_from_caches([base]) is False
