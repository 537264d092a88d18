"""What the weight-only Triton launcher holds between calls, so that a forward's host work is small.

At 16 tokens an H200 computes a 4096 x 4096 layer in under 10 us, less than the Python around the
launch took (``docs/benchmarks.md``). So the launcher keeps, per packed weight, a *launch plan* per
token count and activation dtype (grid, tile configuration, the weight's arguments and strides), and
the layout caches are looked up by ``id`` in a plain dict. These tests check that what is held is
what a fresh launch would compute: after in-place edits, ``.data`` swaps, a new bias, a re-read tuned
table, and after the weight is freed.
"""

from __future__ import annotations

import gc

import pytest
import torch

from qdlm_export.kernels import tuned
from qdlm_export.kernels.layouts import LayoutCache
from qdlm_export.kernels.weight_only import dequantize_packed
from tests.kernel_inputs import DEV, needs_triton, random_packed_weight


class _Entry:
    def __init__(self, key=()):
        self.key, self.nbytes = key, 0


def test_an_entry_lives_as_long_as_its_tensor():
    cache = LayoutCache()
    kept, freed = torch.randn(8), torch.randn(8)
    a, b = cache.put(kept, _Entry(("a",))), cache.put(freed, _Entry(("b",)))
    assert cache.get(kept) is a and cache.get(freed) is b and len(cache) == 2
    assert cache.current(kept, ("a",)) is a and cache.current(kept, ("other",)) is None
    assert cache.get(torch.randn(8)) is None  # another tensor, even one made at a freed one's address
    del freed
    gc.collect()
    assert len(cache) == 1 and cache.get(kept) is a
    cache.forget(kept)
    assert cache.get(kept) is None and len(cache) == 0
    replaced = cache.put(kept, _Entry(("c",)))
    assert cache.put(kept, _Entry(("d",))) is not replaced and cache.get(kept).key == ("d",) and len(cache) == 1


def _reference(x, packed, scale, zero, bits, group, k, bias=None):
    """float64 product with the dequantized weight (rounded to the activations' dtype, as the kernels do)."""
    w = dequantize_packed(packed.cpu(), scale.cpu(), None if zero is None else zero.cpu(), bits, group, k,
                          dtype=x.dtype).double()
    y = x.cpu().double() @ w.T
    return y if bias is None else y + bias.cpu().double()


def _close(y, ref):
    err = (y.cpu().double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, f"relative error {err:.3g} against the float64 dequantized reference"


@pytest.fixture
def counted_plans(monkeypatch):
    """The launcher module with its plan maker counted: ``made`` lists (tokens, dtype) per plan made."""
    from qdlm_export.kernels import weight_only_triton

    made = []
    make = weight_only_triton._make_plan

    def counting(x2, *args):
        made.append((x2.shape[0], x2.dtype))
        return make(x2, *args)

    monkeypatch.setattr(weight_only_triton, "_make_plan", counting)
    return weight_only_triton, made


@needs_triton
def test_a_plan_is_made_once_per_token_count_and_dtype(gen, counted_plans):
    wot, made = counted_plans
    n_out, k, group = 48, 256, 64
    _, packed, scale, zero = random_packed_weight(gen, n_out, k, 4, group, symmetric=False, scale_dtype=torch.bfloat16)
    packed, scale, zero = packed.to(DEV), scale.to(DEV), zero.to(DEV)
    x5 = torch.randn(5, k, generator=gen).to(DEV, torch.bfloat16)
    x3 = torch.randn(3, k, generator=gen).to(DEV, torch.float16)
    first = wot.weight_only_linear_triton(x5, packed, scale, zero, 4, group, k)
    again = wot.weight_only_linear_triton(x5.clone(), packed, scale, zero, 4, group, k)
    assert torch.equal(first, again) and made == [(5, torch.bfloat16)]
    _close(first, _reference(x5, packed, scale, zero, 4, group, k))
    y3 = wot.weight_only_linear_triton(x3, packed, scale, zero, 4, group, k)
    _close(y3, _reference(x3, packed, scale, zero, 4, group, k))
    assert made == [(5, torch.bfloat16), (3, torch.float16)]
    # a [1, 5, k] batch is the same 5 rows: the same plan, the batch's shape on the output
    y = wot.weight_only_linear_triton(x5[None], packed, scale, zero, 4, group, k)
    assert y.shape == (1, 5, n_out) and torch.equal(y[0], first) and len(made) == 2


@needs_triton
def test_a_changed_weight_bias_or_table_gets_a_new_plan(gen, counted_plans):
    wot, made = counted_plans
    n_out, k, group = 32, 128, 32
    codes, packed, scale, _ = random_packed_weight(gen, n_out, k, 4, group, symmetric=True, scale_dtype=torch.bfloat16)
    packed, scale = packed.to(DEV), scale.to(DEV)
    x = torch.randn(4, k, generator=gen).to(DEV, torch.bfloat16)
    y1 = wot.weight_only_linear_triton(x, packed, scale, None, 4, group, k)
    bias = torch.randn(n_out, generator=gen).to(DEV, torch.bfloat16)
    y_bias = wot.weight_only_linear_triton(x, packed, scale, None, 4, group, k, bias)
    _close(y_bias, _reference(x, packed, scale, None, 4, group, k, bias))
    scale.mul_(2)  # in place: the version counter moves; a power of two scales the output exactly
    assert torch.equal(wot.weight_only_linear_triton(x, packed, scale, None, 4, group, k), 2 * y1)
    other_codes, other_packed, _, _ = random_packed_weight(gen, n_out, k, 4, group, symmetric=True)
    assert not torch.equal(other_codes, codes)
    packed.data = other_packed.to(DEV)  # a .data swap keeps the tensor object: its storage is new
    _close(wot.weight_only_linear_triton(x, packed, scale, None, 4, group, k),
           _reference(x, packed, scale, None, 4, group, k))
    assert len(made) == 4
    tuned.forget()  # a tuned table read again: plans made from the old one are not used
    wot.weight_only_linear_triton(x, packed, scale, None, 4, group, k)
    assert len(made) == 5


@needs_triton
@pytest.mark.parametrize("bits", [8, 4], ids=["w8a8_codes", "w4a4_packed"])
def test_the_integer_gemm_plans_follow_the_weight_too(gen, monkeypatch, bits):
    from qdlm_export.kernels import int8_triton

    made = []
    make = int8_triton._packed_plan
    monkeypatch.setattr(int8_triton, "_packed_plan", lambda M, *a: made.append(M) or make(M, *a))
    n_out, k = 24, 64
    _, packed, scale, _ = random_packed_weight(gen, n_out, k, bits, -1, symmetric=True, scale_dtype=torch.float32)
    packed, scale = packed.to(DEV), scale.to(DEV)
    qmax = 127 if bits == 8 else 7
    x_q = torch.randint(-qmax, qmax + 1, (3, k), generator=gen, dtype=torch.int8).to(DEV)
    x_s = torch.rand(3, 1, generator=gen).to(DEV)

    def run(bias=None):
        return int8_triton.packed_int_linear_triton(x_q, x_s, packed, scale, None, bits, -1, k, bias, torch.float32)

    def reference(bias=None):
        return _reference(x_q.float() * x_s, packed, scale, None, bits, -1, k, bias)

    y1 = run()
    _close(y1, reference())
    assert torch.equal(run(), y1) and made == [3]  # held
    scale.mul_(2)  # in place: a power of two scales the float32 output exactly
    assert torch.equal(run(), 2 * y1) and len(made) == 2
    bias = torch.randn(n_out, generator=gen).to(DEV)
    _close(run(bias), reference(bias))
    _, other, _, _ = random_packed_weight(gen, n_out, k, bits, -1, symmetric=True)
    packed.data = other.to(DEV)  # a .data swap: new codes under the same tensor object
    _close(run(), reference())
    assert len(made) == 4
    tuned.forget()
    run()
    assert len(made) == 5


@needs_triton
def test_plans_per_weight_are_bounded(gen, counted_plans, monkeypatch):
    wot, made = counted_plans
    monkeypatch.setattr(wot._PLANS, "limit", 2)
    _, packed, scale, _ = random_packed_weight(gen, 16, 64, 4, 32, symmetric=True, scale_dtype=torch.bfloat16)
    packed, scale = packed.to(DEV), scale.to(DEV)
    for m in (1, 2, 3, 1):
        x = torch.randn(m, 64, generator=gen).to(DEV, torch.bfloat16)
        _close(wot.weight_only_linear_triton(x, packed, scale, None, 4, 32, 64), _reference(x, packed, scale, None, 4, 32, 64))
    assert [m for m, _ in made] == [1, 2, 3, 1]  # the third token count started the weight's plans over
    assert wot._PLANS.held(packed) == 2


@needs_triton
def test_a_strided_weight_is_read_as_a_copy_each_call(gen, counted_plans):
    """A packed weight without unit stride runs from a contiguous copy made per call, as before: the
    plan holds no weight, so the copy is not kept."""
    wot, made = counted_plans
    _, packed, scale, _ = random_packed_weight(gen, 16, 64, 4, 32, symmetric=True, scale_dtype=torch.bfloat16)
    strided = torch.stack([packed, packed], dim=-1)[..., 0].to(DEV)
    assert strided.stride(-1) != 1
    x = torch.randn(2, 64, generator=gen).to(DEV, torch.bfloat16)
    for _ in range(2):
        _close(wot.weight_only_linear_triton(x, strided, scale.to(DEV), None, 4, 32, 64),
               _reference(x, packed, scale, None, 4, 32, 64))
    assert len(made) == 1 and wot._PLANS.held(strided) == 1


@needs_triton
@pytest.mark.parametrize("path", ["weight_only", "w8a8_codes", "w4a4_packed"])
def test_a_freed_weight_takes_its_plans_with_it(gen, path):
    """Plans are held beside the weight, not by it: once the model lets go of its tensors they are freed
    (a plan holding the weight, or a view of it, would keep both alive for the life of the process)."""
    import weakref

    from qdlm_export.kernels import int8_triton, weight_only_triton
    from qdlm_export.kernels.layouts import _GROUP_MAJOR

    bits, group = (8, -1) if path == "w8a8_codes" else (4, 32 if path == "weight_only" else -1)
    _, packed, scale, _ = random_packed_weight(gen, 16, 64, bits, group, symmetric=True, scale_dtype=torch.float32)
    packed, scale = packed.to(DEV), scale.to(DEV)
    bias = torch.randn(16, generator=gen).to(DEV)
    x = torch.randn(2, 64, generator=gen).to(DEV, torch.bfloat16)
    if path == "weight_only":
        plans = weight_only_triton._PLANS
        y = weight_only_triton.weight_only_linear_triton(x, packed, scale, None, bits, group, 64, bias.to(x.dtype))
        _close(y, _reference(x, packed, scale, None, bits, group, 64, bias.to(x.dtype)))
    else:
        plans = int8_triton._PLANS
        x_q = torch.randint(-7, 8, (2, 64), generator=gen, dtype=torch.int8).to(DEV)
        x_s = torch.rand(2, 1, generator=gen).to(DEV)
        y = int8_triton.packed_int_linear_triton(x_q, x_s, packed, scale, None, bits, group, 64, bias, torch.float32)
        _close(y, _reference(x_q.float() * x_s, packed, scale, None, bits, group, 64, bias))
    assert plans.held(packed) == 1
    alive = [weakref.ref(t) for t in (packed, scale, bias)]
    held, group_major = len(plans._held), len(_GROUP_MAJOR)
    del packed, scale, bias, y
    gc.collect()
    assert [r() is None for r in alive] == [True, True, True]
    assert len(plans._held) == held - 1
    assert len(_GROUP_MAJOR) == group_major - (group != -1)  # grouped scales had a group-major copy
