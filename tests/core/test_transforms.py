"""Online transform ops and activation quantizers against explicit float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from qdlm_export.core.activations import (
    ActivationSpec,
    RangeObserver,
    activation_codes,
    quantize_activation,
)
from qdlm_export.core.transforms import (
    apply_input_transforms,
    hadamard_matrix,
    hadamard_transform,
    has_hadamard,
    transform_tensor_specs,
    transform_weight,
)
from qdlm_export.errors import CheckpointError
from qdlm_export.format.spec import module_spec
from qdlm_export.kernels.int8 import quantize_per_token_torch

GEN = torch.Generator().manual_seed(0)


def _sylvester(p: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < p:
        H = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), H)
    return H


def _paley12() -> torch.Tensor:
    """Paley I for q = 11, written out from the quadratic residues mod 11."""
    residues = {1, 3, 4, 5, 9}
    chi = [0] + [1 if z in residues else -1 for z in range(1, 11)]
    H = torch.ones(12, 12, dtype=torch.float64)
    for a in range(11):
        H[a + 1, 0] = -1
        for b in range(11):
            H[a + 1, b + 1] = chi[(a - b) % 11] + (1 if a == b else 0)
    return H


# ---- Hadamard matrices ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 24, 48, 96, 768, 148, 296, 1184, 28, 56, 3584 // 16, 20, 36, 40, 52, 60, 108, 140])
def test_hadamard_is_orthogonal_with_pm1_entries(n):
    H = hadamard_matrix(n)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal((H * math.sqrt(n)).round().abs(), torch.ones(n, n, dtype=torch.float64))


def test_hadamard_matches_independent_constructions():
    assert torch.equal(hadamard_matrix(64) * 8, _sylvester(64))
    # 12 * 2^k is the Paley factor (outer) times Sylvester (inner).
    expected = torch.kron(_paley12(), _sylvester(4)) / math.sqrt(48)
    assert torch.allclose(hadamard_matrix(48), expected, atol=1e-15)


@pytest.mark.parametrize("n", [12 * 1024, 148 * 128, 28 * 128])  # LLaDA-8B MLP, Dream-7B MLP and hidden
def test_fast_transform_of_real_model_sizes_is_orthogonal(n):
    x = torch.randn(16, n, generator=GEN, dtype=torch.float64)
    y = hadamard_transform(x)
    # Gram matrix preserved <=> the transform is orthogonal on these vectors.
    assert torch.allclose(y @ y.T, x @ x.T, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("n", [768, 1184, 448])
def test_fast_transform_equals_dense_matrix(n):
    x = torch.randn(5, n, generator=GEN, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n), atol=1e-12)


def test_sizes_without_a_construction_are_refused():
    # 188 = 4 * 47: neither Paley construction nor the Williamson table; 6 = 2 * 3: no Hadamard matrix exists.
    assert not has_hadamard(188) and not has_hadamard(188 * 64) and not has_hadamard(6)
    assert has_hadamard(156) and has_hadamard(172) and has_hadamard(11008)  # the Williamson table
    with pytest.raises(ValueError, match="188"):
        hadamard_matrix(188)
    with pytest.raises(ValueError, match="12032 = 188 \\* 64.*nearest sizes with one are 11840, 11968, 12160, 12288"):
        transform_tensor_specs([{"op": "hadamard", "size": 188 * 64, "stride": 1}], 188 * 64)


# ---- each op against an explicit matrix ---------------------------------------------------------------


def _matrix(ops, tensors, d: int) -> torch.Tensor:
    """The op list's matrix T (x -> x T) as computed by apply_input_transforms on the identity."""
    return apply_input_transforms(torch.eye(d, dtype=torch.float64), ops, tensors)


def test_smooth_op():
    s = torch.rand(16, generator=GEN) + 0.5
    x = torch.randn(3, 16, generator=GEN, dtype=torch.float64)
    ref = x @ torch.diag(1 / s.double())
    assert torch.allclose(apply_input_transforms(x, [{"op": "smooth"}], {"input_smooth": s}), ref, atol=1e-12)


def test_hadamard_ops_full_over_heads_and_blocks():
    d = 48
    x = torch.randn(4, d, generator=GEN, dtype=torch.float64)
    full = apply_input_transforms(x, [{"op": "hadamard", "size": 48, "stride": 1}], {})
    assert torch.allclose(full, x @ hadamard_matrix(48), atol=1e-12)
    # Over 12 "heads" of 4: H(12) (x) I(4).
    heads = apply_input_transforms(x, [{"op": "hadamard", "size": 12, "stride": 4}], {})
    assert torch.allclose(heads, x @ torch.kron(hadamard_matrix(12), torch.eye(4, dtype=torch.float64)), atol=1e-12)
    # Block-diagonal H(16): I(3) (x) H(16).
    blocks = apply_input_transforms(x, [{"op": "hadamard", "size": 16, "stride": 1}], {})
    assert torch.allclose(blocks, x @ torch.block_diag(*[hadamard_matrix(16)] * 3), atol=1e-12)


@pytest.mark.parametrize("per_block", [True, False])
def test_block_rotation_op(per_block):
    b, nb = 8, 3
    rots = torch.linalg.qr(torch.randn(nb if per_block else 1, b, b, generator=GEN, dtype=torch.float64))[0]
    op = {"op": "block_rotation", "tensor": "input_rotation_1", "block_size": b, "blocks": rots.shape[0]}
    x = torch.randn(2, 5, b * nb, generator=GEN, dtype=torch.float64)
    ref = x @ torch.block_diag(*(rots if per_block else [rots[0]] * nb))
    assert torch.allclose(apply_input_transforms(x, [op], {"input_rotation_1": rots}), ref, atol=1e-12)


def test_permute_op():
    perm = torch.randperm(10, generator=GEN)
    P = torch.zeros(10, 10, dtype=torch.float64)
    P[perm, torch.arange(10)] = 1  # (x P)_j = x_perm[j]
    x = torch.randn(3, 10, generator=GEN, dtype=torch.float64)
    got = apply_input_transforms(x, [{"op": "permute", "tensor": "input_permutation"}], {"input_permutation": perm})
    assert torch.allclose(got, x @ P, atol=0)


def test_op_chain_and_weight_fold_compute_the_original_product():
    d, b = 32, 8
    tensors = {
        "input_smooth": torch.rand(d, generator=GEN) + 0.5,
        "input_rotation_1": torch.linalg.qr(torch.randn(d // b, b, b, generator=GEN, dtype=torch.float64))[0],
        "input_permutation": torch.randperm(d, generator=GEN),
    }
    ops = [
        {"op": "smooth"},
        {"op": "hadamard", "size": 4, "stride": 8},
        {"op": "block_rotation", "tensor": "input_rotation_1", "block_size": b},
        {"op": "permute", "tensor": "input_permutation"},
        {"op": "quantize_input"},  # a marker: ignored by the transforms
    ]
    T = _matrix(ops, tensors, d)
    expected = (
        torch.diag(1 / tensors["input_smooth"].double())
        @ torch.kron(hadamard_matrix(4), torch.eye(8, dtype=torch.float64))
        @ torch.block_diag(*tensors["input_rotation_1"])
    )[:, tensors["input_permutation"]]
    assert torch.allclose(T, expected, atol=1e-12)
    W = torch.randn(6, d, generator=GEN, dtype=torch.float64)
    x = torch.randn(5, d, generator=GEN, dtype=torch.float64)
    folded = transform_weight(W, ops, tensors).double()
    assert torch.allclose((x @ T) @ folded.T, x @ W.T, rtol=1e-5, atol=1e-5)  # folded weight is float32


def test_tensor_specs_and_validation():
    ops = [
        {"op": "smooth"},
        {"op": "block_rotation", "tensor": "input_rotation_1", "block_size": 8, "blocks": 1},
        {"op": "block_rotation", "tensor": "input_rotation_2", "block_size": 8},
        {"op": "permute", "tensor": "input_permutation"},
        {"op": "hadamard", "size": 4, "stride": 8},
        {"op": "quantize_input"},
    ]
    assert transform_tensor_specs(ops, 32) == {
        "input_smooth": (torch.float32, (32,)),
        "input_rotation_1": (torch.float32, (1, 8, 8)),
        "input_rotation_2": (torch.float32, (4, 8, 8)),
        "input_permutation": (torch.int64, (32,)),
    }
    for bad in (
        [{"op": "hadamard", "size": 12, "stride": 1}],  # does not tile 32
        [{"op": "block_rotation", "tensor": "r", "block_size": 5}],
        [{"op": "block_rotation", "tensor": "r", "block_size": 8, "blocks": 2}],
        [{"op": "rotate_everything"}],
    ):
        with pytest.raises(ValueError):
            transform_tensor_specs(bad, 32)
    qconfig = {
        "weights": {"bits": 4, "group_size": -1, "symmetric": True, "scale_dtype": "float32"},
        "transforms": {"modules": {"m": [{"op": "hadamard", "size": 12, "stride": 1}]}},
    }
    with pytest.raises(CheckpointError, match="module m"):
        module_spec(qconfig, "m", 32, 8, False)


# ---- activation quantizers ---------------------------------------------------------------------------


def _ref_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip: float) -> torch.Tensor:
    """Per-row fake quantization written directly from docs/FORMAT.md, in float64."""
    x = x.double()
    lo = x.amin(-1, keepdim=True).clamp(max=0) * clip
    hi = x.amax(-1, keepdim=True).clamp(min=0) * clip
    rnd = lambda v: torch.floor(v.abs() + 0.5) * torch.sign(v)  # noqa: E731
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = torch.maximum(-lo, hi) / qmax
        return rnd(x / s).clamp(-qmax, qmax) * s
    s = (hi - lo) / (2**bits - 1)
    z = rnd(-lo / s).clamp(0, 2**bits - 1)
    return ((rnd(x / s) + z).clamp(0, 2**bits - 1) - z) * s


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_dynamic_per_token_quantizer(bits, symmetric, clip):
    x = torch.randn(3, 7, 64, generator=GEN)
    x[..., 5] *= 30  # an outlier channel
    spec = ActivationSpec(bits=bits, granularity="token", symmetric=symmetric, clip_ratio=clip)
    got = quantize_activation(x, spec)
    assert torch.allclose(got.double(), _ref_fake_quant(x, bits, symmetric, clip), rtol=1e-5, atol=1e-6)
    q, scale, zero = activation_codes(x, spec)
    if symmetric:
        assert q.dtype == torch.int8 and q.abs().max() <= 2 ** (bits - 1) - 1
    else:
        assert q.dtype == torch.uint8 and q.max() <= 2**bits - 1
    assert scale.shape == (3, 7, 1)


def test_symmetric_codes_agree_with_the_int8_kernel_convention():
    x = torch.randn(33, 96, generator=GEN) * 3
    for bits in (4, 8):
        q, s, _ = activation_codes(x, ActivationSpec(bits=bits))
        kq, ks = quantize_per_token_torch(x, bits=bits)
        assert torch.equal(q, kq) and torch.allclose(s, ks)


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_per_tensor_quantizer(symmetric):
    spec = ActivationSpec(bits=8, granularity="tensor", symmetric=symmetric, clip_ratio=0.8)
    observer = RangeObserver()
    batches = [torch.randn(4, 32, generator=GEN) + 0.3 for _ in range(3)]
    for b in batches:
        observer.add(b)
    tensors = observer.tensors(spec)
    assert set(tensors) == ({"input_scale"} if symmetric else {"input_scale", "input_zero_point"})
    assert set(spec.tensor_specs()) == set(tensors)
    allx = torch.cat(batches)
    lo, hi = min(allx.min().item(), 0) * 0.8, max(allx.max().item(), 0) * 0.8
    if symmetric:
        assert tensors["input_scale"].item() == pytest.approx(max(-lo, hi) / 127, rel=1e-6)
    else:
        assert tensors["input_scale"].item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    got = quantize_activation(allx, spec, tensors["input_scale"], tensors.get("input_zero_point"))
    # Inside the clipped range the error is at most half a step; outside it is clipped.
    inside = (allx >= lo) & (allx <= hi)
    step = tensors["input_scale"].item()
    assert (got - allx)[inside].abs().max() <= step / 2 + 1e-6
    with pytest.raises(ValueError):
        quantize_activation(allx, spec)  # static without its scale


def test_zero_tokens_stay_zero():
    x = torch.zeros(2, 16)
    for symmetric in (True, False):
        assert torch.equal(quantize_activation(x, ActivationSpec(bits=4, symmetric=symmetric)), x)


def test_cached_matrices_built_under_a_meta_device_context_hold_data():
    """transformers builds models under ``torch.device("meta")``; a loader that first needs a
    Hadamard factor there (a cold process loading a QuaRot checkpoint) must still cache real data."""
    from qdlm_export.core import hadamard as Hd
    from qdlm_export.core import transforms as T

    Hd.small_hadamard.cache_clear()
    with torch.device("meta"):
        factor = Hd.small_hadamard(12)
        williamson = Hd.small_hadamard(172)
    assert factor.device.type == "cpu" and williamson.device.type == "cpu"
    x = torch.randn(3, 768, dtype=torch.float64)
    torch.testing.assert_close(T.hadamard_transform(x), x @ T.hadamard_matrix(768), rtol=1e-12, atol=1e-12)
