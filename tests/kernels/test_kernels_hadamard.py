"""Hadamard matrices and transforms: constructions verified from their defining identity, transforms
checked against explicit float64 matrix products built independently here, and both checked
against the checkpoint format's definition (``qdlm_export.core.hadamard``, through ``qdlm_export.core.transforms``).

Triton cases run compiled on a CUDA GPU when there is one, else in the CPU interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py); they are skipped without triton.
"""

from __future__ import annotations

import math

import pytest
import torch

from qdlm_export import kernels
from qdlm_export.kernels.hadamard import (
    HADAMARD_ORDERS,
    hadamard_k,
    hadamard_matrix,
    hadamard_transform_torch,
    split_size,
)
from tests.kernel_inputs import DEV, HAS_TRITON, needs_triton

RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def sylvester_ref(n: int) -> torch.Tensor:
    """Natural-order Sylvester matrix by repeated Kronecker products with [[1, 1], [1, -1]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h, base)
    return h


def sylvester_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``rows`` of the natural-order Sylvester matrix of order n: (-1)**popcount(i & j)."""
    v = rows[:, None] & torch.arange(n)[None, :]
    parity = torch.zeros_like(v)
    while bool(v.any()):
        parity ^= v & 1
        v >>= 1
    return (1 - 2 * parity).double()


def explicit(n: int) -> torch.Tensor:
    """H_n = H_m (x) S_p from the order-m matrix and the reference Sylvester matrix."""
    k, p = split_size(n)
    return torch.kron(hadamard_k(k).double(), sylvester_ref(p))


def assert_rel(y, ref, rtol, what):
    scale = ref.abs().max().item() + 1e-30
    err = (y.double() - ref).abs().max().item()
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    assert err <= rtol * scale, f"{what}: max error {err:.3e} vs {rtol * scale:.3e}"


# ---------------------------------------------------------------------------------------------
# Constructions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", HADAMARD_ORDERS + (44, 68, 76, 84, 92, 116))
def test_order_k_matrix_is_hadamard(k):
    h = hadamard_k(k)
    assert h.shape == (k, k) and h.dtype == torch.int64
    assert set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64))


def test_order_188_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="188"):
        hadamard_k(188)
    with pytest.raises(ValueError, match="12032 = 188 \\* 64"):
        split_size(188 * 64)  # 187 = 11 * 17 and 93 = 3 * 31: no Paley; 47 is not in the Williamson table
    with pytest.raises(ValueError, match="multiple of 4"):
        split_size(6)
    with pytest.raises(kernels.KernelBackendError, match="188"):
        kernels.hadamard_transform(torch.randn(2, 188 * 4))


@pytest.mark.parametrize(
    "n,expect",
    [(4096, (1, 4096)), (12288, (12, 1024)), (18944, (148, 128)), (3584, (28, 128)), (160, (20, 8)),
     (11008, (172, 64)), (13824, (108, 128)), (14336, (28, 512))],
)
def test_split_size_of_model_dims(n, expect):
    assert split_size(n) == expect


@pytest.mark.parametrize(
    "n", [16, 256, 12 * 16, 20 * 8, 28 * 4, 36 * 4, 40 * 4, 52 * 4, 60 * 4, 108, 140 * 4, 148 * 4, 156 * 4, 172 * 4]
)
def test_hadamard_matrix_is_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.equal(h, explicit(n))
    assert torch.equal(sylvester_ref(64), sylvester_rows(torch.arange(64), 64))
    hn = hadamard_matrix(n, normalized=True)
    assert torch.allclose(hn @ hn.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_order_40_is_never_chosen():
    assert split_size(40 * 64) == (20, 128)  # the format splits 40 * 2**k as 20 * 2**(k+1)
    assert 40 not in HADAMARD_ORDERS


@pytest.mark.parametrize(
    "n", [1024, 12 * 64, 20 * 32, 28 * 128, 36 * 16, 44 * 4, 52 * 4, 60 * 4, 108 * 4, 140 * 4, 148 * 8, 172 * 16]
)
def test_same_matrices_as_the_checkpoint_format(gen, n):
    from qdlm_export.core import transforms

    x = torch.randn(3, n, generator=gen, dtype=torch.float64)
    assert_rel(kernels.hadamard_transform(x), transforms.hadamard_transform(x), 1e-12, "transform")


# ---------------------------------------------------------------------------------------------
# torch transform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n",
    [
        1,
        2,
        8,
        128,
        256,
        2048,
        12 * 64,
        20 * 32,
        28 * 128,
        36 * 16,
        40 * 8,
        52 * 4,
        60 * 4,
        108 * 4,
        140 * 4,
        148 * 8,
        156 * 4,
        172 * 4,
        92 * 2,
        44 * 4,
    ],
)
def test_torch_transform_equals_explicit_matmul(gen, n):
    x = torch.randn(5, n, generator=gen, dtype=torch.float64)
    h = explicit(n)
    assert_rel(hadamard_transform_torch(x, normalized=False), x @ h, 1e-12, "forward")
    assert_rel(hadamard_transform_torch(x, normalized=False, inverse=True), x @ h.T, 1e-12, "inverse")
    assert_rel(hadamard_transform_torch(x), x @ h / math.sqrt(n), 1e-12, "normalized")


@pytest.mark.parametrize("n", [12288, 18944, 32768, 11008])
def test_torch_transform_large_model_dims_on_sampled_rows(gen, n):
    """Full matrices are too big; check 64 random output columns against rows of H built here."""
    k, p = split_size(n)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64)
    y = hadamard_transform_torch(x, normalized=False)
    cols = torch.randint(0, n, (64,), generator=gen)
    hk = hadamard_k(k).double()
    # column i of H_m (x) S_p is H_m[:, i // p] (x) S_p[:, i % p] (S is symmetric: a row)
    columns = (hk[:, cols // p].T[:, :, None] * sylvester_rows(cols % p, p)[:, None, :]).reshape(64, n)
    assert_rel(y[:, cols], x @ columns.T, 1e-12, f"n={n}")


@pytest.mark.parametrize("n", [64, 4096, 12 * 256, 28 * 128, 148 * 16, 20 * 4, 172 * 8])
def test_orthogonal_and_involution(gen, n):
    x = torch.randn(7, n, generator=gen, dtype=torch.float64)
    y = hadamard_transform_torch(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(hadamard_transform_torch(y, inverse=True), x, atol=1e-12)
    k, _ = split_size(n)
    if torch.equal(hadamard_k(k), hadamard_k(k).T):  # powers of two, Paley II: symmetric
        assert torch.allclose(hadamard_transform_torch(y), x, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_transform_low_precision(gen, dtype):
    n = 12 * 128
    x = torch.randn(2, 3, n, generator=gen).to(dtype)
    y = kernels.hadamard_transform(x, backend="torch")
    assert y.dtype == dtype and y.shape == x.shape
    assert_rel(y, x.double() @ explicit(n) / math.sqrt(n), RTOL[dtype], str(dtype))


# ---------------------------------------------------------------------------------------------
# Triton FWHT (interpreter)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("n,rows", [(16, 1), (64, 37), (128, 20), (256, 3), (2048, 5), (16384, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_fwht(gen, n, rows, dtype):
    from qdlm_export.kernels.hadamard_triton import fwht_triton

    x = torch.randn(rows, n, generator=gen).to(dtype)
    out = torch.full_like(x, float("nan"), device=DEV)
    fwht_triton(x.to(DEV), 0.25, out=out)
    out = out.cpu()
    cols = torch.randperm(n, generator=gen)[:256]  # 256 sampled output columns (n up to 16384)
    assert_rel(out[:, cols], 0.25 * x.double() @ sylvester_rows(cols, n).T, RTOL[dtype], f"n={n}")
    assert torch.isfinite(out).all(), "poisoned output not fully written"


@needs_triton
@pytest.mark.parametrize("n", [12 * 64, 148 * 128, 40 * 16, 1024])
def test_triton_backend_through_dispatch(gen, n):
    x = torch.randn(2, 3, n, generator=gen)
    expect = hadamard_transform_torch(x.double())
    assert_rel(kernels.hadamard_transform(x.to(DEV), backend="triton").cpu(), expect, 1e-5, "forward")
    inv = kernels.hadamard_transform(expect.float().to(DEV), inverse=True, backend="triton").cpu()
    assert_rel(inv, x.double(), 1e-5, "inverse")


def _skip_before_hopper(ht, n: int) -> None:
    """Natively on a GPU before sm_90 the fused kernel is not used (it spills there): nothing to test."""
    reason = ht.fused_unsupported_reason(n, DEV)
    if reason and "Hopper" in reason:
        pytest.skip(reason)


@needs_triton
def test_fused_hadamard_is_for_hopper_and_the_interpreter(monkeypatch):
    """Compiled for sm_80 / 89 / 100 / 120 the fused kernel spills its row to local memory, so natively
    it runs on sm_90 only; the interpreter (these tests on the CPU) runs it everywhere."""
    import qdlm_export.kernels.hadamard_triton as ht

    n = 12 * 1024
    monkeypatch.setattr(ht, "interpret_mode", lambda: False)
    for arch in (80, 89, 90, 100, 120):
        monkeypatch.setattr(ht, "cuda_arch", lambda device=None, arch=arch: arch)
        reason = ht.fused_unsupported_reason(n, "cuda")
        assert (reason is None) == (arch == 90) and (arch == 90 or "Hopper" in reason)
    monkeypatch.setattr(ht, "interpret_mode", lambda: True)
    assert ht.fused_unsupported_reason(n, "cpu") is None
    assert ht.fused_unsupported_reason(n) is None  # no device: whether one program can hold the row


@needs_triton
@pytest.mark.parametrize("n", [12 * 16, 20 * 64, 12 * 1024, 60 * 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_hadamard_applies_the_order_k_factor_in_the_same_kernel(gen, monkeypatch, n, dtype):
    """n = k * p with k > 1 (LLaDA-8B's 12288 = 12 * 1024): one kernel applies S_p and H_k (padded to
    16 or 64 rows; p = 16 ... 1024, one or two Sylvester factors), forward and inverse, against the
    float64 torch transform; the two-step path (H_k in torch) is not taken."""
    import qdlm_export.kernels.hadamard_triton as ht

    def two_step(*args, **kwargs):
        raise AssertionError("H_k was applied in torch, not in the kernel")

    monkeypatch.setattr(ht, "with_hadamard_k", two_step)
    assert ht.fused_unsupported_reason(n) is None
    _skip_before_hopper(ht, n)
    x = torch.randn(3, n, generator=gen).to(dtype)
    for inverse in (False, True):
        ref = hadamard_transform_torch(x.double(), inverse=inverse)
        y = ht.hadamard_triton(x.to(DEV), True, inverse).cpu()
        assert y.dtype == dtype
        assert_rel(y, ref, RTOL[dtype], f"n={n} inverse={inverse}")


@needs_triton
def test_triton_hadamard_keeps_two_steps_where_a_row_does_not_fit(gen):
    """148 * 128 (Dream-7B's 18944) pads H_k to 256 rows: too large for one program; the power-of-two
    kernel runs, then H_k in torch, and the result is the same transform."""
    from qdlm_export.kernels.hadamard_triton import fused_unsupported_reason, hadamard_triton

    n = 148 * 128
    assert "exceeds" in fused_unsupported_reason(n) and "no H_k" in fused_unsupported_reason(1024)
    x = torch.randn(2, n, generator=gen).to(torch.bfloat16)
    assert_rel(hadamard_triton(x.to(DEV)).cpu(), hadamard_transform_torch(x.double()), RTOL[torch.bfloat16],
               "two-step")


def test_hadamard_backend_choice():
    assert kernels.select_backend("hadamard", "cpu", n=4096).name == "torch"
    text = kernels.describe_backend("hadamard", "cuda", n=18944)
    assert text.startswith(("fast_hadamard_transform", "triton", "torch"))
    if HAS_TRITON:
        with pytest.raises(kernels.KernelBackendError, match="outside"):
            kernels.select_backend("hadamard", DEV, backend="triton", n=4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_loaded_quarot_model_runs_its_online_hadamards_through_the_kernels(tmp_path, monkeypatch, force_backend, backend):
    """A QuaRot checkpoint's online Hadamards (over heads, and the 768 = 12 * 64 down projection) go
    through kernel dispatch when a backend is forced (and always on a GPU): the loaded model then
    computes what the format's reference transform computes, and the dispatch was really called."""
    from transformers import AutoModel

    import qdlm_export  # noqa: F401
    from qdlm_export.fixtures import build_tiny_model
    from qdlm_export.quantize.api import make_config, quantize

    src = build_tiny_model("llada", tmp_path / "src", seed=5, hidden_size=256, intermediate_size=768,
                           num_layers=1, num_heads=16)  # 16 heads: Triton's smallest power of two
    out = tmp_path / "quarot"
    from qdlm_export.core.configs import CalibrationConfig

    quantize(str(src), out, make_config("quarot", bits=8, act_bits=8, weight_method="rtn"), trust_remote_code=True,
             verify=False, calibration=CalibrationConfig(nsamples=2, seqlen=32))
    # on DEV: a forced Triton backend runs compiled on a GPU machine, in the interpreter on a CPU one
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval().to(DEV)
    ids = torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()))))
    ids = ids.to(DEV)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    import qdlm_export.kernels.hadamard as kernel_hadamard
    from qdlm_export.core.transforms import hadamard_transform_reference

    calls, errors = [], []
    real = kernel_hadamard.hadamard_transform

    def spy(x, *args, **kwargs):
        y = real(x, *args, **kwargs)
        want = hadamard_transform_reference(x.double())
        calls.append(x.shape[-1])
        errors.append(((y.double() - want).norm() / want.norm()).item())
        return y

    monkeypatch.setattr(kernel_hadamard, "hadamard_transform", spy)
    force_backend(backend)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert sorted(set(calls)) == [16, 768]
    assert max(errors) < 1e-5  # each online transform is the format's matrix product
    # End to end the same up to 8-bit activation codes that float rounding moved across a boundary.
    assert ((got - reference).norm() / reference.norm()).item() < 1e-2


@needs_triton
def test_triton_hadamard_falls_back_to_two_steps_when_the_fused_kernel_fails(gen, monkeypatch):
    """A Triton that cannot compile the fused kernel (reshapes, permutes) warns once and keeps the
    two-step path, with the same result, instead of failing the model's forward."""
    import qdlm_export.kernels.hadamard_triton as ht

    real = ht._launch

    def failing(x2, y2, scale, k, p, hk):
        if k > 1:
            raise RuntimeError("PassManager::run failed")
        return real(x2, y2, scale, k, p, hk)

    monkeypatch.setattr(ht, "_launch", failing)
    monkeypatch.setattr(ht, "FUSED_FAILED", {})
    n = 12 * 64
    _skip_before_hopper(ht, n)
    x = torch.randn(3, n, generator=gen)
    with pytest.warns(RuntimeWarning, match="fused Triton Hadamard of size 768 failed"):
        y = ht.hadamard_triton(x.to(DEV)).cpu()
    assert_rel(y, hadamard_transform_torch(x.double()), RTOL[torch.float32], "fallback")
    assert list(ht.FUSED_FAILED) == [(n, torch.float32, DEV.type)]
    y2 = ht.hadamard_triton(x.to(DEV)).cpu()  # no second attempt, no second warning
    assert_rel(y2, hadamard_transform_torch(x.double()), RTOL[torch.float32], "fallback again")


# ---------------------------------------------------------------------------------------------
# The format's reference with its butterflies in C (what a loaded model runs on the CPU)
# ---------------------------------------------------------------------------------------------

_native_reason = __import__("qdlm_export.kernels.cpu_native", fromlist=["x"]).unavailable_reason()
needs_native = pytest.mark.skipif(_native_reason is not None, reason=str(_native_reason))


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_c_butterflies_give_the_reference_bit_for_bit(gen, threads):
    """Every size a checkpoint's online Hadamard takes (powers of two from 2, and k * p with p below and
    above one 16-float vector), a strided input, many rows: the same float32 bits as the reference."""
    from qdlm_export.core.hadamard import hadamard_transform_reference
    from qdlm_export.kernels.cpu_hadamard import hadamard_reference_cpu

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, rows in [(2, 5), (8, 3), (16, 7), (64, 300), (1024, 9), (12 * 4, 6), (20 * 64, 4), (12 * 1024, 3),
                        (148 * 128, 2), (4096, 130)]:
            x = torch.randn(rows, n, generator=gen) * torch.rand(rows, 1, generator=gen) * 50
            got = hadamard_reference_cpu(x)
            assert torch.equal(got, hadamard_transform_reference(x)), n
        x = torch.randn(2, 128, 32, generator=gen).transpose(-1, -2)  # heads over a strided axis
        assert torch.equal(hadamard_reference_cpu(x), hadamard_transform_reference(x))
        assert x.is_contiguous() is False and hadamard_reference_cpu(x).shape == x.shape
    finally:
        torch.set_num_threads(before)


@needs_native
def test_online_hadamards_on_the_cpu_run_the_c_butterflies(gen, monkeypatch):
    import qdlm_export.kernels.cpu_hadamard as ch
    from qdlm_export.core.hadamard import hadamard_transform_reference
    from qdlm_export.core.transforms import hadamard_transform as online

    calls = []
    real = ch.native_butterflies
    monkeypatch.setattr(ch, "native_butterflies", lambda t: calls.append(t.shape) or real(t))
    x = torch.randn(3, 768, generator=gen)
    assert torch.equal(online(x), hadamard_transform_reference(x)) and calls == [(3, 12, 64)]
    assert torch.equal(online(x.double()), hadamard_transform_reference(x.double())) and len(calls) == 1
