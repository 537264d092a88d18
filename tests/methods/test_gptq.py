"""GPTQ: the solver against independent references (RTN, direct Hessians), then the block method."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from qdlm_export.core.schemes import (
    WeightScheme,
    compute_qparams,
    dequantize,
    quantize_rtn,
    quantize_with_qparams,
)
from qdlm_export.errors import ConfigError
from qdlm_export.families import FamilyAdapter, LinearGroup, family_by_name
from qdlm_export.methods.base import BlockCalibration
from qdlm_export.methods.gptq import (
    GPTQ,
    GPTQConfig,
    HessianAccumulator,
    collect_hessians,
    gptq_quantize,
)
from qdlm_export.methods.registry import method_class
from qdlm_export.methods.rtn import RTN, RTNConfig
from tests.dense_models import decoder_block

PREFIX = "model.layers.0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- synthetic layer --------------------------------------------------------------------------------


def _correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, :6] *= 25  # a few outlier channels
    return x


def _layer(out=192, cols=512, n=2048, seed=0):
    x = _correlated_inputs(n, cols, seed)
    w = torch.randn(out, cols, generator=torch.Generator().manual_seed(seed + 1)) / cols**0.5
    return w, x, 2.0 / n * x.T @ x


def _out_err(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return ((w_hat - w) @ x.T).pow(2).sum().item()


def test_hessian_accumulator_is_the_running_average_of_2xxT():
    x = _correlated_inputs(700, 64)
    acc = HessianAccumulator(64)
    for chunk in (x[:100], x[100:450].reshape(5, 70, 64), x[450:]):  # ragged, 3-D batches too
        acc.add_batch(chunk)
    assert acc.nsamples == 700
    torch.testing.assert_close(acc.H, 2.0 / 700 * x.T @ x, rtol=1e-4, atol=1e-3)


def test_hessian_accumulated_by_lower_block_columns_is_the_whole_symmetric_matrix():
    """Widths that are not a multiple of the block, and a read between batches (which mirrors the
    lower triangle) followed by more batches, against float64."""
    width = 2 * HessianAccumulator.BLOCK + 37
    x = torch.randn(300, width, dtype=torch.float64) @ torch.randn(width, width, dtype=torch.float64) / width**0.5
    acc = HessianAccumulator(width)
    acc.add_batch(x[:120].float())
    torch.testing.assert_close(acc.H.double(), 2.0 / 120 * x[:120].T @ x[:120], rtol=1e-5, atol=1e-5)
    acc.add_batch(x[120:].float())
    H = acc.H.double()
    torch.testing.assert_close(H, 2.0 / 300 * x.T @ x, rtol=1e-5, atol=1e-5)
    assert torch.equal(H, H.T)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_output_error_below_rtn(bits, symmetric):
    w, x, h = _layer()
    scheme = WeightScheme(bits=bits, group_size=128, symmetric=symmetric)
    rtn = _out_err(quantize_rtn(w, scheme).dequantize(), w, x)
    gptq = _out_err(gptq_quantize(w, h, scheme).dequantize(), w, x)
    assert gptq <= rtn
    if bits == 3:
        assert gptq <= 0.8 * rtn


@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_gives_rtn_exactly(group_size, symmetric):
    w, _, _ = _layer(out=64, cols=256)
    scheme = WeightScheme(bits=4, group_size=group_size, symmetric=symmetric)
    got = gptq_quantize(w, torch.eye(256), scheme)
    ref = quantize_rtn(w, scheme)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scale, ref.scale)
    if symmetric:
        assert got.zero_point is None
    else:
        assert torch.equal(got.zero_point, ref.zero_point)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_are_those_the_stored_qparams_produce(act_order, symmetric):
    w, _, h = _layer(out=64, cols=256)
    scheme = WeightScheme(bits=3, group_size=64, symmetric=symmetric)
    q = gptq_quantize(w, h, scheme, act_order=act_order, scale_dtype=torch.float16, block_size=48)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) <= scheme.max_code
    assert q.scale.dtype == torch.float16 and q.scale.shape == (64, 4)
    assert (q.zero_point is None) == symmetric
    w_hat = q.dequantize()
    assert torch.equal(w_hat, dequantize(q.codes, q.scale, q.zero_point, scheme))
    zero = q.zero_point.float() if q.zero_point is not None else torch.full(q.scale.shape, float(scheme.symmetric_zero))
    # The dequantized weight is a fixed point of the stored grid: re-quantizing gives the same codes.
    assert torch.equal(quantize_with_qparams(w_hat, q.scale, zero, scheme), q.codes)


def test_act_order_keeps_static_contiguous_groups():
    w, x, h = _layer(out=128, cols=512)
    scheme = WeightScheme(bits=4, group_size=128, symmetric=True)
    q = gptq_quantize(w, h, scheme, act_order=True, static_groups=True)
    # Every group's qparams are those of its contiguous, unpermuted columns of the original W.
    ref_scale, _ = compute_qparams(w, scheme)
    assert q.scale.shape == (128, 4)
    assert torch.equal(q.scale, ref_scale)
    assert _out_err(q.dequantize(), w, x) <= _out_err(quantize_rtn(w, scheme).dequantize(), w, x)
    with pytest.raises(ValueError, match="g_idx"):
        gptq_quantize(w, h, scheme, act_order=True, static_groups=False)
    with pytest.raises(ConfigError, match="g_idx"):
        GPTQConfig(act_order=True, static_groups=False)


def _reference_gptq(w, h, scheme, damp):
    """The paper's greedy column loop written out plainly (float64, no blocks, no Cholesky): quantize
    column j, spread its error over the remaining columns with the inverse Hessian of the remaining
    columns, then drop column j from that inverse (Gaussian elimination)."""
    w = w.double().clone()
    h = h.double() + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    group = scheme.effective_group_size(w.shape[1])
    row_scheme = WeightScheme(bits=scheme.bits, group_size=-1, symmetric=scheme.symmetric)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for j in range(w.shape[1]):
        if j % group == 0:
            scale, zero = compute_qparams(w[:, j : j + group].float(), row_scheme)
        q = quantize_with_qparams(w[:, j : j + 1].float(), scale, zero, row_scheme)
        codes[:, j] = q[:, 0]
        w_hat = (q[:, 0].double() - zero[:, 0].double()) * scale[:, 0].double()
        err = (w[:, j] - w_hat) / hinv[j, j]
        w[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
        hinv -= torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("block_size", [1, 16, 48, 1000])
def test_blocked_solver_matches_the_plain_greedy_reference(block_size):
    w, _, h = _layer(out=48, cols=128, n=1024)
    scheme = WeightScheme(bits=3, group_size=32, symmetric=False)
    ref = _reference_gptq(w, h, scheme, damp=0.01)
    got = gptq_quantize(w, h, scheme, damp=0.01, block_size=block_size)
    # Float32 vs float64 may flip a rare rounding tie; everything else must agree.
    assert (got.codes == ref).float().mean().item() >= 0.995


def test_dead_columns_are_zeroed_and_solved():
    w, x, _ = _layer(out=64, cols=256)
    dead = torch.tensor([0, 5, 130, 255])
    x[:, dead] = 0
    h = 2.0 / x.shape[0] * x.T @ x
    scheme = WeightScheme(bits=4, group_size=128, symmetric=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damping needed: dead inputs get H_ii = 1
        gptq_quantize(w, h, scheme, damp=0.0)
    q = gptq_quantize(w, h, scheme)
    w_hat = q.dequantize()
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[:, dead], torch.zeros(64, 4))
    assert _out_err(w_hat, w, x) <= _out_err(quantize_rtn(w, scheme).dequantize(), w, x)


def test_indefinite_hessian_raises_damping_with_a_warning():
    w, _, _ = _layer(out=32, cols=128)
    v = torch.ones(128) / 128**0.5
    h = torch.eye(128) - 3 * torch.outer(v, v)  # eigenvalue -2, positive diagonal
    with pytest.warns(RuntimeWarning, match="damp"):
        q = gptq_quantize(w, h, WeightScheme(bits=4, group_size=64), damp=0.01)
    assert torch.isfinite(q.dequantize()).all()


def test_mse_clip_lowers_weight_error_norm():
    w, _, _ = _layer(out=64, cols=256)
    scheme = WeightScheme(bits=3, group_size=128, symmetric=True)
    # With H = I there is no error feedback, so the only difference is each group's clipped range.
    plain = gptq_quantize(w, torch.eye(256), scheme)
    mse = gptq_quantize(w, torch.eye(256), scheme, mse_clip=True)

    def norm(q):
        return (q.dequantize() - w).abs().pow(2.4).reshape(64, 2, 128).sum(-1)

    assert (norm(mse) <= norm(plain) + 1e-6).all()
    assert norm(mse).sum() < 0.95 * norm(plain).sum()


@pytest.mark.parametrize("bits,symmetric,scale_dtype", [(4, False, torch.float16), (3, True, torch.bfloat16),
                                                       (2, False, torch.float32), (8, True, torch.float16)])
def test_mse_search_is_the_plain_grid_search(bits, symmetric, scale_dtype):
    """The cache-blocked search (chunks of rows through every candidate, the clamp folded around the
    zero point) keeps exactly the scale and zero point that the plain search does: every candidate
    through ``compute_qparams`` and ``quantize_with_qparams``, least ``sum |w - w_hat|^2.4`` first."""
    from qdlm_export.methods.gptq_solver import _MSE_CHUNK, _mse_search

    gen = torch.Generator().manual_seed(bits * 10 + symmetric)
    rows = _MSE_CHUNK // 128 + 37  # two chunks, the second partial
    w = torch.randn(rows, 128, generator=gen) * 0.02
    w[:: 97] *= 20  # outlier rows
    w[5] = 0  # an all-zero group: scale 1
    w[6, :64] = 0
    w[7] = w[7].abs()  # no negative values: the range starts at 0
    scheme = WeightScheme(bits=bits, group_size=-1, symmetric=symmetric)
    best = torch.full((rows,), float("inf"), dtype=torch.float64)
    want_scale = torch.empty(rows, dtype=scale_dtype)
    want_zero = torch.empty(rows)
    for i in range(80):
        s, z = compute_qparams(w, scheme, scale_dtype, clip_ratio=1 - i / 100)
        q = quantize_with_qparams(w, s, z, scheme).float()
        err = ((q - z) * s.float() - w).abs().pow(2.4).sum(1)
        better = err < best
        best = torch.where(better, err.double(), best)
        want_scale[better], want_zero[better] = s[better, 0], z[better, 0]
    scale, zero = _mse_search(w, scheme, scale_dtype, 80, 100, 2.4)
    assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero)


# ---- block level --------------------------------------------------------------------------------------


def _block(kind: str, seed: int = 0):
    return decoder_block(kind, seed, batches=16)


def _block_mse(block, ref, calib) -> float:
    return sum((o - r).pow(2).mean().item() for o, r in zip(calib.run(block), ref)) / len(ref)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_block_gptq_below_rtn_and_complete(kind):
    config, block, calib = _block(kind)
    adapter = family_by_name("dense-decoder")
    ref = calib.run(block)
    for bits in (4, 3):
        rtn_block = copy.deepcopy(block)
        RTN(RTNConfig(bits=bits, group_size=128), adapter, config).quantize_block(rtn_block, PREFIX, calib)
        gptq_block = copy.deepcopy(block)
        results = GPTQ(GPTQConfig(bits=bits, group_size=128), adapter, config).quantize_block(gptq_block, PREFIX, calib)
        assert list(results) == [f"{PREFIX}.{name}" for name in adapter.linear_names]  # every linear, in order
        for name in adapter.linear_names:
            linear = gptq_block.get_submodule(name)
            assert torch.equal(linear.weight.data, results[f"{PREFIX}.{name}"].dequantize())  # block is quantized
        assert results[f"{PREFIX}.self_attn.v_proj"].bias is gptq_block.self_attn.v_proj.bias  # biases ride along
        assert _block_mse(gptq_block, ref, calib) <= _block_mse(rtn_block, ref, calib)


def test_true_sequential_collects_each_group_after_the_previous_is_quantized(monkeypatch):
    config, block, calib = _block("qwen2")
    adapter = family_by_name("dense-decoder")
    names = {id(block.get_submodule(n)): n for n in adapter.linear_names}
    events: list[tuple[str, str]] = []
    for name in adapter.linear_names:
        block.get_submodule(name).register_forward_pre_hook(lambda m, a: events.append(("fwd", names[id(m)])))
    original = GPTQ.load_quantized

    def logged(linear, qweight):
        events.append(("load", names[id(linear)]))
        original(linear, qweight)

    monkeypatch.setattr(GPTQ, "load_quantized", staticmethod(logged))
    GPTQ(GPTQConfig(bits=4), adapter, config).quantize_block(block, PREFIX, calib)

    loads = [name for kind, name in events if kind == "load"]
    assert loads == list(adapter.linear_names)
    load_at = {name: i for i, (kind, name) in enumerate(events) if kind == "load"}
    previous_end = -1
    for group in adapter.groups:
        first = min(load_at[n] for n in group.linears)
        # A full calibration pass over this group's linears happened after the previous group was
        # loaded quantized, and before this group was quantized.
        window = events[previous_end + 1 : first]
        for name in group.linears:
            assert window.count(("fwd", name)) == len(calib)
        previous_end = max(load_at[n] for n in group.linears)


def test_not_true_sequential_collects_once():
    config, block, calib = _block("llama")
    adapter = family_by_name("dense-decoder")
    calls = []
    block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    GPTQ(GPTQConfig(bits=4, true_sequential=False), adapter, config).quantize_block(block, PREFIX, calib)
    assert len(calls) == len(calib)


def test_misnamed_linear_fails_loudly_instead_of_being_skipped():
    # The study's LLaDA GPTQ silently skipped q/k/v through a name mismatch; a wrong name must fail.
    config, block, calib = _block("llama")
    good = family_by_name("dense-decoder")
    bad = FamilyAdapter(
        name="bad",
        model_types=(),
        blocks=good.blocks,
        groups=(LinearGroup(("self_attn.attn_q", "self_attn.k_proj"), norm="input_layernorm", role="qkv"),),
        embeddings=good.embeddings,
        final_norm=good.final_norm,
        lm_head=good.lm_head,
    )
    with pytest.raises(AttributeError):
        GPTQ(GPTQConfig(), bad, config).quantize_block(block, PREFIX, calib)


def test_unused_linear_is_an_error():
    _, block, calib = _block("llama")
    block.add_module("spare", torch.nn.Linear(256, 256))
    with pytest.raises(RuntimeError, match="spare"):
        collect_hessians(block, {"spare": block.spare}, calib)


def test_registered_with_config():
    assert method_class("gptq") is GPTQ
    assert GPTQ.needs_calibration
    cfg = GPTQConfig.from_options(bits=3, damp=0.05, act_order=True)
    assert cfg.method_options() == {
        "damp": 0.05,
        "block_size": 128,
        "act_order": True,
        "static_groups": True,
        "mse_clip": False,
        "true_sequential": True,
        "expert_calibration": "all-tokens",
        "min_expert_tokens": 1,
        "expert_fallback": "all-tokens",
    }
    with pytest.raises(ConfigError):
        GPTQConfig(damp=-1)
    with pytest.raises(ConfigError):
        GPTQConfig(block_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GPTQConfig(act_order=True, static_groups=False, group_size=-1)  # per channel needs no g_idx


def test_hessian_collection_stops_each_forward_once_the_group_has_its_inputs():
    """feed_inputs gives every listed linear exactly its forward-time input, and stops the block's
    forward right after the last of them: later modules never run."""
    from torch import nn

    from qdlm_export.methods.capture import feed_inputs

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.calls = []

        def forward(self, x):
            self.calls.append("a")
            h = self.a(x)
            self.calls.append("b")
            h = self.b(torch.relu(h))
            self.calls.append("c")
            return self.c(h)

    block = Block()
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    got = {"a": [], "b": []}
    seen = feed_inputs(block, {"a": block.a, "b": block.b}, BlockCalibration(hidden=xs),
                       lambda name, x: got[name].append(x))
    assert seen == {"a": 3, "b": 3} and block.calls == ["a", "b"] * 3  # c never ran
    for x, xa, xb in zip(xs, got["a"], got["b"]):
        torch.testing.assert_close(xa, x)
        torch.testing.assert_close(xb, torch.relu(block.a(x)))
    acc = collect_hessians(block, {"a": block.a}, BlockCalibration(hidden=xs))["a"]
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    torch.testing.assert_close(acc.H.double(), 2 * flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-6)


# ---- the factor, shared Hessians and stacked solves -------------------------------------------------


def test_factor_is_the_reverse_cholesky_and_its_inverse_the_textbook_factor():
    """R R^T = H + damp*mean(diag H)*I, R upper; R^-1 is the upper Cholesky factor of the damped
    inverse the paper's loop uses (computed here in float64 the textbook way)."""
    from qdlm_export.methods.gptq import factor_hessian

    _, _, h = _layer(out=8, cols=192, n=512)
    factor = factor_hessian(h, damp=0.01)
    damped = h.double() + 0.01 * torch.diag(h).double().mean() * torch.eye(192, dtype=torch.float64)
    R = factor.R.double()
    assert torch.equal(R, R.triu()) and bool((R.diagonal() > 0).all())
    torch.testing.assert_close(R @ R.T, damped, rtol=1e-5, atol=1e-4 * damped.diagonal().mean().item())
    textbook = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    torch.testing.assert_close(torch.linalg.inv(R), textbook, rtol=1e-4, atol=1e-5 * textbook.abs().max().item())


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_solve_with_a_shared_factor_equals_separate_solves(act_order):
    from qdlm_export.methods.gptq import factor_hessian

    w, _, h = _layer(out=96, cols=256)
    scheme = WeightScheme(bits=3, group_size=64, symmetric=False)
    factor = factor_hessian(h, 0.01, act_order)
    stacked = gptq_quantize(w, factor, scheme, act_order=act_order)
    # Rows are independent in GPTQ; only the float32 rounding of differently shaped products differs.
    for rows in (slice(0, 40), slice(40, 96)):
        alone = gptq_quantize(w[rows], h, scheme, act_order=act_order)
        assert (stacked.codes[rows] == alone.codes).float().mean().item() >= 0.999
        torch.testing.assert_close(stacked.scale[rows], alone.scale, rtol=1e-5, atol=0)
        assert (stacked.zero_point[rows] == alone.zero_point).float().mean().item() >= 0.99
    with pytest.raises(ValueError, match="act_order"):
        gptq_quantize(w, factor, scheme, act_order=not act_order)


def test_linears_reading_one_input_share_one_hessian():
    _, block, calib = _block("llama")
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    linears = {n: block.get_submodule(n) for n in names}
    accs = collect_hessians(block, linears, calib)
    assert accs[names[0]] is accs[names[1]] is accs[names[2]]
    # Against the inputs recorded independently of the accumulator.
    seen = []
    handle = linears[names[1]].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 256).double()))
    calib.run(block)
    handle.remove()
    flat = torch.cat(seen)
    torch.testing.assert_close(accs[names[0]].H.double(), 2 * flat.T @ flat / flat.shape[0], rtol=1e-4, atol=1e-3)
    assert accs[names[0]].nsamples == flat.shape[0]


def test_hessians_stay_apart_when_shared_inputs_stop_being_shared():
    """Two linears fed one tensor on the first batch and different tensors afterwards: each must end
    with the Hessian of its own inputs (the sharing is dropped and the inputs collected again)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            y = x if self.calls == 1 else x.flip(-1) * 3
            return self.a(x) + self.b(y)

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 7, 16, generator=g) for _ in range(3)]
    block = Block()
    accs = collect_hessians(block, {"a": block.a, "b": block.b}, BlockCalibration(hidden=xs))
    assert accs["a"] is not accs["b"]
    flat_a = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    # b's inputs: the second collection pass sees calls 4..6, all transformed.
    flat_b = torch.cat([x.flip(-1).reshape(-1, 16) * 3 for x in xs]).double()
    torch.testing.assert_close(accs["a"].H.double(), 2 * flat_a.T @ flat_a / 42, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(accs["b"].H.double(), 2 * flat_b.T @ flat_b / 42, rtol=1e-5, atol=1e-4)


def test_block_results_equal_one_linear_at_a_time():
    """The method's stacked q/k/v and gate/up solves give each linear exactly what gptq_quantize gives
    it alone on the same Hessian (the block is quantized group by group, as true sequential does)."""
    config, block, calib = _block("qwen2")
    adapter = family_by_name("dense-decoder")
    reference = copy.deepcopy(block)
    cfg = GPTQConfig(bits=4, group_size=128, symmetric=False)
    results = GPTQ(cfg, adapter, config).quantize_block(block, PREFIX, calib)
    for group in adapter.groups:
        linears = {n: reference.get_submodule(n) for n in group.linears}
        seen = {n: [] for n in linears}
        handles = [m.register_forward_pre_hook(lambda m, a, n=n, seen=seen: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
                   for n, m in linears.items()]
        calib.run(reference)
        for handle in handles:
            handle.remove()
        for name, linear in linears.items():
            x = torch.cat(seen[name])
            h = 2.0 / x.shape[0] * x.T @ x
            alone = gptq_quantize(linear.weight.data, h, cfg.scheme, act_order=cfg.act_order)
            got = results[f"{PREFIX}.{name}"]
            assert (got.codes == alone.codes).float().mean().item() >= 0.999, name
            linear.weight.data = got.dequantize()  # the next group sees what the method's did


def test_half_turn_in_place_is_the_double_flip():
    from qdlm_export.methods.gptq_solver import _half_turn_

    gen = torch.Generator().manual_seed(13)
    for n, rows in ((1, 256), (7, 2), (8, 3), (300, 256), (513, 64)):
        m = torch.randn(n, n, generator=gen)
        want = m.flip(0, 1)
        assert torch.equal(_half_turn_(m, rows), want)


def test_factoring_a_released_hessian_frees_it_and_keeps_the_factor():
    """GPTQ hands its Hessian over (HessianAccumulator.release): the accumulator keeps nothing, and
    once the factorization returns nothing else holds the Hessian either; the factor equals the one
    made from a Hessian the caller keeps."""
    import weakref

    from qdlm_export.methods.gptq import HessianAccumulator, factor_hessian

    gen = torch.Generator().manual_seed(17)
    acc = HessianAccumulator(96)
    acc.add_batch(torch.randn(200, 96, generator=gen))
    kept = acc.H.clone()
    for act_order in (False, True):
        h = acc.H.clone()
        ref = weakref.ref(h)
        factor = factor_hessian(h, 0.01, act_order)
        assert ref() is not None  # the caller's own reference is left alone
        assert torch.equal(h, kept)
    released = acc.release()
    assert acc.H.numel() == 0
    ref = weakref.ref(released)
    factor_released = factor_hessian(released, 0.01, True)
    del released
    assert ref() is None
    assert torch.equal(factor_released.R, factor.R) and torch.equal(factor_released.perm, factor.perm)
