"""AWQ: exact folding, searches against direct references, and block error below RTN."""

from __future__ import annotations

import copy

import pytest
import torch

from qdlm_export.methods.rtn import RTNConfig
from qdlm_export.errors import ConfigError
from qdlm_export.families import family_by_name
from qdlm_export.methods import awq as awq_module
from qdlm_export.methods.awq import AWQ, AWQConfig, query_key_linears, search_clip, search_scale
from qdlm_export.methods.folding import divide_norm
from qdlm_export.methods.registry import method_class
from qdlm_export.methods.rtn import RTN
from tests.dense_models import OUTLIER_CHANNELS as OUTLIERS
from tests.dense_models import decoder_block as _block
from qdlm_export.core.schemes import WeightScheme, compute_qparams, dequantize, quantize_rtn, quantize_with_qparams

PREFIX = "model.layers.0"
ADAPTER = family_by_name("dense-decoder")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel_err(outs, refs) -> float:
    num = sum((o - r).pow(2).sum().item() for o, r in zip(outs, refs))
    return (num / sum(r.pow(2).sum().item() for r in refs)) ** 0.5


def _block_mse(block, ref, calib) -> float:
    return sum((o - r).pow(2).mean().item() for o, r in zip(calib.run(block), ref)) / len(ref)


# ---- folding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_folded_unquantized_block_computes_as_the_original(kind):
    config, block, calib = _block(kind)
    ref = calib.run(block)
    norm_before = block.input_layernorm.weight.detach().clone()
    method = AWQ(AWQConfig(bits=4), ADAPTER, config)
    masters, _ = method.search_and_fold(block, PREFIX, calib)
    assert _rel_err(calib.run(block), ref) <= 1e-5
    assert not torch.equal(block.input_layernorm.weight, norm_before)  # a scale really was folded
    for name in ADAPTER.linear_names:
        assert torch.equal(block.get_submodule(name).weight.data, masters[name])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fold_is_exact_for_arbitrary_scales(kind, monkeypatch):
    # Force a strong random scale on every pair so that each fold path (norm, linear rows + bias) is
    # exercised whatever the search would pick.
    config, block, calib = _block(kind)
    ref = calib.run(block)
    v_bias_before = block.self_attn.v_proj.bias.detach().clone()
    gen = torch.Generator().manual_seed(7)

    def random_scale(weights, schemes, x_abs_mean, gram, *, grid, scale_dtype):
        return torch.rand(x_abs_mean.shape, generator=gen) * 4 + 0.1, 0.5, [1.0]

    monkeypatch.setattr(awq_module, "search_scale", random_scale)
    method = AWQ(AWQConfig(bits=4, clip_search=False), ADAPTER, config)
    method.search_and_fold(block, PREFIX, calib)
    assert _rel_err(calib.run(block), ref) <= 1e-5
    v_scaled = not torch.equal(block.self_attn.v_proj.bias, v_bias_before)
    # MHA: v feeds o channel for channel, so o's scale goes into v's rows and bias. GQA: skipped.
    assert v_scaled == (kind == "llama")


def test_gqa_v_to_o_pair_skipped_and_mha_pair_applied():
    for kind, applied in (("qwen2", False), ("llama", True)):
        config, block, calib = _block(kind)
        method = AWQ(AWQConfig(bits=4), ADAPTER, config)
        method.quantize_block(block, PREFIX, calib)
        entry = method.search_log[f"{PREFIX}:attn_out"]
        assert ("alpha" in entry) == applied, entry
        assert ("skipped" in entry) == (not applied)
        for role in ("qkv", "gate_up", "down"):
            assert "alpha" in method.search_log[f"{PREFIX}:{role}"]


def test_fold_into_low_precision_norm_uses_the_realised_scale():
    norm = torch.nn.LayerNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    old = norm.weight.detach().float().clone()
    s = torch.rand(64) * 3 + 0.2
    realised = divide_norm(norm, s)
    torch.testing.assert_close(norm.weight.float() * realised, old, rtol=1e-6, atol=0)
    torch.testing.assert_close(realised, s, rtol=1e-2, atol=0)


def test_fold_into_norm_with_bias_is_exact_in_float32():
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(10, 64)
    ref = norm(x).detach()
    s = torch.rand(64) * 3 + 0.2
    realised = divide_norm(norm, s)
    assert realised is s
    torch.testing.assert_close(norm(x).detach() * s, ref, rtol=1e-5, atol=1e-6)


# ---- searches against direct references ---------------------------------------------------------------


def _tokens(n=1024, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) * (torch.rand(cols, generator=g) + 0.2)
    x[:, OUTLIERS] *= 30
    return x


def test_scale_search_loss_is_the_output_mse_and_beats_rtn():
    x = _tokens()
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(96, 256, generator=g) / 16, torch.randn(64, 256, generator=g) / 16]
    scheme = WeightScheme(bits=3, group_size=128, symmetric=False)
    s, alpha, losses = search_scale(weights, [scheme, scheme], x.abs().mean(0), x.T @ x / x.shape[0], grid=20)
    assert len(losses) == 20 and 0 < alpha < 1
    assert min(losses) < 0.8 * losses[0]  # alpha = 0 is RTN

    # The Gram-matrix loss equals the directly computed output MSE of the group's linears.
    def direct(scale):
        err = [x @ ((quantize_rtn(w * scale, scheme).dequantize() / scale) - w).T for w in weights]
        return torch.cat(err, dim=1).pow(2).mean().item()

    assert direct(torch.ones(256)) == pytest.approx(losses[0], rel=1e-3)
    assert direct(s) == pytest.approx(min(losses), rel=1e-3)
    assert (s.max() * s.min()).sqrt().item() == pytest.approx(1.0, rel=1e-5)  # llm-awq's normalisation


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_minimises_each_groups_partial_output_error(symmetric):
    x = _tokens(512)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) / 16
    w[:, 5] *= 8  # weight outliers make clipping worthwhile
    scheme = WeightScheme(bits=3, group_size=64, symmetric=symmetric)
    xg = x.reshape(-1, 4, 64).transpose(0, 1)
    grams = xg.transpose(1, 2) @ xg / x.shape[0]
    ratio = search_clip(w, grams, scheme, clip_grid=20, max_shrink=0.5)
    assert ratio.shape == (128, 4)
    grid = torch.tensor([1 - i / 20 for i in range(11)])
    assert torch.isin(ratio, grid).all() and (ratio < 1).any()

    def partial_err(clip):
        scale, zero = compute_qparams(w, scheme, clip_ratio=clip)
        d = dequantize(quantize_with_qparams(w, scale, zero, scheme), scale, zero, scheme) - w
        return torch.einsum("tgk,rgk->trg", x.reshape(-1, 4, 64), d.reshape(128, 4, 64)).pow(2).mean(0)

    chosen = partial_err(ratio)
    for p in grid.tolist():  # no grid point beats the chosen one on any (row, group)
        assert (chosen <= partial_err(p) * (1 + 1e-4) + 1e-9).all()
    assert chosen.sum() < 0.9 * partial_err(1.0).sum()


def test_clip_search_sees_the_scaled_inputs():
    # After a group's scale is folded, its clip search must use x / s: recomputing the clips from the
    # folded block's own inputs gives the same ratios.
    config, block, calib = _block("llama", batches=4)
    method = AWQ(AWQConfig(bits=3), ADAPTER, config)
    masters, clips = method.search_and_fold(block, PREFIX, calib)
    for name in ("mlp.gate_proj", "mlp.down_proj"):
        linear = block.get_submodule(name)
        stats = awq_module.capture_group_input(block, linear, calib, 512)
        scheme = WeightScheme(bits=3, group_size=128, symmetric=False)
        grams = awq_module._group_grams(scheme, linear.in_features, None, stats.sampled_tokens())
        again = search_clip(masters[name], grams, scheme, clip_grid=20, max_shrink=0.5)
        assert (again == clips[name]).float().mean().item() >= 0.99


def test_input_stats_divide_matches_capturing_scaled_inputs():
    x = _tokens(300)
    s = torch.rand(256) + 0.5
    idx = torch.tensor([0, 10, 299])
    a, b = awq_module.InputStats(256, "cpu", idx), awq_module.InputStats(256, "cpu", idx)
    a.add_batch(x[:100]), a.add_batch(x[100:])
    b.add_batch(x / s)
    a.divide_inputs(s)
    torch.testing.assert_close(a.mean_gram, b.mean_gram, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.abs_mean, b.abs_mean)
    torch.testing.assert_close(a.sampled_tokens(), b.sampled_tokens())


def test_query_key_projections_found_by_structure():
    assert query_key_linears(ADAPTER) == {"self_attn.q_proj", "self_attn.k_proj"}
    assert query_key_linears(family_by_name("llada")) == {"q_proj", "k_proj"}


@pytest.mark.parametrize("skip", [True, False])
def test_clip_skip_qk(skip):
    config, block, calib = _block("qwen2", batches=2)
    _, clips = AWQ(AWQConfig(bits=4, clip_skip_qk=skip), ADAPTER, config).search_and_fold(block, PREFIX, calib)
    qk = {"self_attn.q_proj", "self_attn.k_proj"}
    assert set(clips) == set(ADAPTER.linear_names) - (qk if skip else set())


# ---- block level --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_block_awq_below_rtn_and_complete(kind):
    config, block, calib = _block(kind)
    ref = calib.run(block)
    for bits in (4, 3):
        rtn_block = copy.deepcopy(block)
        RTN(RTNConfig(bits=bits, group_size=128, symmetric=False), ADAPTER, config).quantize_block(
            rtn_block, PREFIX, calib
        )
        awq_block = copy.deepcopy(block)
        results = AWQ(AWQConfig(bits=bits), ADAPTER, config).quantize_block(awq_block, PREFIX, calib)
        assert list(results) == [f"{PREFIX}.{name}" for name in ADAPTER.linear_names]
        for name, q in results.items():
            linear = awq_block.get_submodule(name[len(PREFIX) + 1 :])
            assert q.zero_point is not None and q.scheme.group_size == 128
            assert torch.equal(linear.weight.data, q.dequantize())
            assert q.bias is linear.bias
        assert _block_mse(awq_block, ref, calib) <= _block_mse(rtn_block, ref, calib)


def test_all_tokens_clip_search_runs():
    config, block, calib = _block("llama", batches=2)
    ref = calib.run(block)
    rtn_block = copy.deepcopy(block)
    RTN(RTNConfig(bits=4, symmetric=False), ADAPTER, config).quantize_block(rtn_block, PREFIX, calib)
    AWQ(AWQConfig(bits=4, clip_tokens=None), ADAPTER, config).quantize_block(block, PREFIX, calib)
    assert _block_mse(block, ref, calib) <= _block_mse(rtn_block, ref, calib)


def test_registered_with_config():
    assert method_class("awq") is AWQ
    assert AWQ.needs_calibration
    cfg = AWQConfig()
    assert (cfg.bits, cfg.group_size, cfg.symmetric) == (4, 128, False)
    assert cfg.method_options() == {
        "grid": 20,
        "clip_search": True,
        "clip_grid": 20,
        "max_shrink": 0.5,
        "clip_tokens": 512,
        "clip_skip_qk": True,
        "expert_calibration": "all-tokens",
        "min_expert_tokens": 1,
        "expert_fallback": "all-tokens",
    }
    for bad in ({"grid": 0}, {"clip_grid": 0}, {"max_shrink": 1.0}, {"clip_tokens": 0}):
        with pytest.raises(ConfigError):
            AWQConfig(**bad)
