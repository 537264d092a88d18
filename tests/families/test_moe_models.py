"""The mixture-of-experts dLLMs (LLaDA2 ``llada2_moe``, LLaDA-MoE ``lladamoe``) "as published"
(fixtures/published/): they load with ``from_pretrained(trust_remote_code=True)`` once the known
transformers-5 repairs are applied, compute what a float64 reimplementation written from the
published code says (routing included), and every expert and shared expert goes through weight-only
quantization (RTN/GPTQ/AWQ) and back.

The float64 reference below is independent of the fixture code and of qdlm_export: it reads the
tensors and config.json and recomputes the forward, and it is fed the dequantized weights of a
checkpoint (tests/reference.py) to check what a reload computes.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.errors import ConfigError
from qdlm_export.families import compat, family_by_name
from qdlm_export.fixtures import build_tiny_moe_model, build_tiny_model
from qdlm_export.format.validation import inspect_checkpoint
from qdlm_export.methods import build_method
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.fidelity import prepare_folder_code
from qdlm_export.quantize.pipeline import capture_block_inputs
from tests.isolation import rel
from tests.reference import dequantized_weights, load_tensors

FAMILIES = ("llada2_moe", "lladamoe")
CALIB = CalibrationConfig(nsamples=8, seqlen=64, seed=0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    # LLaDA2 with trained-like, non-zero router biases: calibration must route with them, and the
    # checkpoint must carry them (persistent buffers).
    return {"llada2_moe": build_tiny_moe_model("llada2_moe", root / "llada2_moe", router_bias=True),
            "lladamoe": build_tiny_model("lladamoe", root / "lladamoe", published=True)}


@pytest.fixture(scope="module")
def written(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-q")

    @functools.cache
    def make(family: str, method: str, bits: int) -> Path:
        out = root / f"{family}-{method}-w{bits}"
        quantize(str(models[family]), out, make_config(method, bits=bits, group_size=32), calibration=CALIB,
                 trust_remote_code=True, verify=False, device="cpu")
        return out

    return make


def _tokens(seed: int, n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 2000, (n, length), generator=torch.Generator().manual_seed(seed))


def _load(folder: Path, family: str):
    auto = family_by_name(family).auto_class
    prepare_folder_code(folder, auto)
    return getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


# ---- the float64 reference, written from the published code ------------------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, cos, sin):
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = d // 2
    turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + turned * sin, rest), dim=-1)


def _mlp(x, t, p):
    gate, up = x @ t[p + "gate_proj.weight"].T, x @ t[p + "up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ t[p + "down_proj.weight"].T


def _route(x, t, p, cfg, llada2):
    """(expert indices [N, k], weights [N, k]) as the published routers compute them."""
    logits = x @ t[p + "mlp.gate.weight"].T
    k = cfg["num_experts_per_tok"]
    if not llada2:  # softmax, top-k, not renormalised
        probs = logits.softmax(-1)
        weight, idx = probs.topk(k, dim=-1)
        return idx, weight
    scores = logits.sigmoid()
    biased = scores + t[p + "mlp.gate.expert_bias"]
    n, groups = biased.shape[0], cfg["n_group"]
    group_score = biased.view(n, groups, -1).topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(cfg["topk_group"], dim=-1).indices
    allowed = torch.zeros(n, groups, dtype=torch.bool).scatter_(1, kept, True).repeat_interleave(biased.shape[1] // groups, 1)
    idx = biased.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
    chosen = scores.gather(1, idx)
    return idx, chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * cfg["routed_scaling_factor"]


def reference_layer(h, t, i, cfg, family):
    """One decoder layer in float64 on hidden states ``h [B, T, H]`` (full attention)."""
    llada2 = family == "llada2_moe"
    p = f"model.layers.{i}."
    eps, (B, T, H) = cfg["rms_norm_eps"], h.shape
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // heads
    x = _rms(h, t[p + "input_layernorm.weight"], eps)
    if llada2:
        qkv = (x @ t[p + "attention.query_key_value.weight"].T).view(B, T, heads + 2 * kv, hd)
        q, k, v = qkv.split([heads, kv, kv], dim=2)
        q, k = _rms(q, t[p + "attention.query_layernorm.weight"], eps), _rms(k, t[p + "attention.key_layernorm.weight"], eps)
        out_w = t[p + "attention.dense.weight"]
    else:
        q = _rms((x @ t[p + "self_attn.q_proj.weight"].T).view(B, T, heads, hd), t[p + "self_attn.q_norm.weight"], eps)
        k = _rms((x @ t[p + "self_attn.k_proj.weight"].T).view(B, T, kv, hd), t[p + "self_attn.k_norm.weight"], eps)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).view(B, T, kv, hd)
        out_w = t[p + "self_attn.o_proj.weight"]
    rd = int(hd * cfg["partial_rotary_factor"])
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((freqs, freqs), -1).sin()[:, None]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k, v = k.repeat_interleave(heads // kv, dim=2), v.repeat_interleave(heads // kv, dim=2)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k).div(math.sqrt(hd)).softmax(-1)
    h = h + torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, heads * hd) @ out_w.T
    x = _rms(h, t[p + "post_attention_layernorm.weight"], eps).reshape(B * T, H)
    if p + "mlp.gate.weight" not in t:
        return h + _mlp(x, t, p + "mlp.").view(B, T, H)
    idx, weight = _route(x, t, p, cfg, llada2)
    y = torch.zeros_like(x)
    for e in range(cfg["num_experts"]):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if len(rows):
            y.index_add_(0, rows, _mlp(x[rows], t, f"{p}mlp.experts.{e}.") * weight[rows, slot, None])
    shared = p + ("mlp.shared_experts." if llada2 else "shared_expert.")
    if shared + "gate_proj.weight" in t:
        y = y + _mlp(x, t, shared)
    return h + y.view(B, T, H)


def reference_logits(folder: Path, tensors: dict[str, torch.Tensor], ids: torch.Tensor, family: str) -> torch.Tensor:
    cfg = json.loads((folder / "config.json").read_text())
    t = {k: v.double() for k, v in tensors.items()}
    h = t["model.word_embeddings.weight" if family == "llada2_moe" else "model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        h = reference_layer(h, t, i, cfg, family)
    return _rms(h, t["model.norm.weight"], cfg["rms_norm_eps"]) @ t["lm_head.weight"].T


def _dequantized_tensors(folder: Path, source: Path | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with its quantized linears dequantized; ``source``: tensors the
    checkpoint lacks come from there."""
    tensors = load_tensors(source) if source is not None else {}
    tensors.update(load_tensors(folder))
    tensors.update({f"{name}.weight": w for name, w in dequantized_weights(folder).items()})
    return tensors


# ---- the published code ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_published_code_loads_with_repairs_and_matches_float64(models, family):
    compat.reset_log()
    model = _load(models[family], family)
    assert {"tied-weights-keys-list", "rope-default-init", "rotary-inv-freq"} <= set(compat.applied_repair_ids())
    ids = _tokens(1)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = reference_logits(models[family], load_tensors(models[family]), ids, family)
    assert torch.isfinite(got).all() and rel(got, want) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_one_sparse_block_matches_float64_on_random_hidden_states(models, family):
    """A random input (not embeddings) through the last (sparse) layer, routing included."""
    model = _load(models[family], family)
    cfg = json.loads((models[family] / "config.json").read_text())
    last = cfg["num_hidden_layers"] - 1
    h = torch.randn(2, 20, cfg["hidden_size"], generator=torch.Generator().manual_seed(7))
    inner = model.model
    pos = torch.arange(20)[None]
    with torch.no_grad():
        got = inner.layers[last](h, position_ids=pos, position_embeddings=inner.rotary_emb(h, pos))[0]
    tensors = {k: v for k, v in load_tensors(models[family]).items()}
    want = reference_layer(h.double(), {k: v.double() for k, v in tensors.items()}, last, cfg, family)
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_lists_every_expert_and_leaves_the_router_alone(models, family):
    adapter = family_by_name(family)
    model = _load(models[family], family)
    keys = set(load_tensors(models[family]))
    cfg = json.loads((models[family] / "config.json").read_text())
    for index, block in enumerate(adapter.block_list(model)):
        resolved = [f"{adapter.block_prefix(index)}.{n}" for g in adapter.block_groups(block) for n in g.linears]
        assert resolved == adapter.stored_linears(index, keys)
        assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in resolved)
        experts = [n for n in resolved if ".mlp.experts." in n]
        sparse = hasattr(block.mlp, "experts")
        assert len(experts) == (3 * cfg["num_experts"] if sparse else 0)
        assert not any(n.endswith(adapter.router) for n in resolved)
    assert adapter.mask_token_id(cfg) == cfg["mask_token_id"] and adapter.has_experts


# ---- weight-only quantization of every expert ---------------------------------------------------------


def _round_trip(models, written, family, method):
    out = written(family, method, 4)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    adapter = family_by_name(family)
    keys = set(load_tensors(models[family]))
    expected = [n for i in range(adapter.num_layers(qc and json.loads((out / "config.json").read_text())))
                for n in adapter.stored_linears(i, keys)]
    assert sorted(qc["quantized_modules"]) == sorted(expected)
    assert sorted(inspect_checkpoint(out, device="cpu").quantized_modules) == sorted(expected)
    model = _load(out, family)
    ids = _tokens(3)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    err = rel(got, reference_logits(out, _dequantized_tensors(out), ids, family))
    assert err <= 1e-3, f"{family} {method}: reload vs float64 reference {err:.2e}"


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_lladamoe_w4_round_trip_quantizes_every_expert(models, written, method):
    _round_trip(models, written, "lladamoe", method)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_llada2_w4_round_trip_quantizes_every_expert(models, written, method):
    _round_trip(models, written, "llada2_moe", method)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_llada2_w4_quantizes_every_expert_and_computes_close_to_float(models, written, method):
    """Every expert listed, and the dequantized model (float64
    reference) close to the float one."""
    out = written("llada2_moe", method, 4)
    listed = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_modules"]
    keys = set(load_tensors(models["llada2_moe"]))
    adapter = family_by_name("llada2_moe")
    assert sorted(listed) == sorted(n for i in range(3) for n in adapter.stored_linears(i, keys))
    assert sum(".mlp.experts." in n for n in listed) == 2 * 8 * 3 and sum(".shared_experts." in n for n in listed) == 6
    ids = _tokens(4)
    float_logits = reference_logits(models["llada2_moe"], load_tensors(models["llada2_moe"]), ids, "llada2_moe")
    dequantized = _dequantized_tensors(out, models["llada2_moe"])
    assert rel(reference_logits(out, dequantized, ids, "llada2_moe"), float_logits) < 0.2


def block_errors(source: Path, tensors: dict[str, torch.Tensor], ids: torch.Tensor, family: str) -> float:
    """Sum over layers of the relative error of each layer's output when layer i of the float model
    and of ``tensors`` get the same (float) input: the per-block measure of quantize/fidelity.py."""
    cfg = json.loads((source / "config.json").read_text())
    ref = {k: v.double() for k, v in load_tensors(source).items()}
    got = {k: v.double() for k, v in tensors.items()}
    h = ref["model.word_embeddings.weight" if family == "llada2_moe" else "model.embed_tokens.weight"][ids]
    total = 0.0
    for i in range(cfg["num_hidden_layers"]):
        want = reference_layer(h, ref, i, cfg, family)
        total += rel(reference_layer(h, got, i, cfg, family), want)
        h = want
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_and_awq_beat_rtn_at_w3_on_held_out_tokens(models, written, family):
    from transformers import AutoTokenizer

    from qdlm_export.fixtures import MASK_ID, tokenizer_dir
    from qdlm_export.quantize.calibration import calibration_tokens

    held_out = calibration_tokens(AutoTokenizer.from_pretrained(tokenizer_dir()),
                                  CalibrationConfig(nsamples=8, seqlen=64, seed=12345, masking="random"), MASK_ID)
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        out = written(family, method, 3)
        errors[method] = block_errors(models[family], _dequantized_tensors(out, models[family]), held_out, family)
    print(f"W3 {family} {errors}")
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors


# ---- experts the calibration never reaches -------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_experts_without_calibration_tokens_fall_back_to_rtn(models, family, method):
    """Two tokens reach at most four of the eight experts: the others are quantized with RTN (their
    exact RTN weights), listed in ``calibration_fallbacks``; the routed ones are calibrated."""
    from qdlm_export.core.schemes import quantize_rtn

    model = _load(models[family], family)
    adapter = family_by_name(family)
    blocks = adapter.block_list(model)
    calib = capture_block_inputs(model, blocks, _tokens(5, n=1, length=2), 1, torch.device("cpu"))
    last = len(blocks) - 1
    for block in list(blocks)[:last]:
        calib.hidden = calib.run(block)
    block = blocks[last]
    originals = {n: m.weight.detach().clone() for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    config = make_config(method, bits=4, group_size=32, expert_calibration="routed", expert_fallback="rtn")
    quant = build_method(config, adapter, model.config)
    prefix = adapter.block_prefix(last)
    results = quant.quantize_block(block, prefix, calib)
    experts = [n for n in results if ".mlp.experts." in n]
    assert len(experts) == 3 * 8
    fallen = set(quant.calibration_fallbacks)
    assert fallen and fallen < set(experts), fallen
    assert len({n.split(".mlp.experts.")[1].split(".")[0] for n in fallen}) >= 4
    for name in fallen:
        local = name[len(prefix) + 1:]
        rtn = quantize_rtn(originals[local], config.scheme, torch.float32)
        assert torch.equal(results[name].dequantize(torch.float64), rtn.dequantize(torch.float64)), name
    assert "no calibration tokens" in next(iter(quant.calibration_fallbacks.values()))


def _quantize_last_block(models, family, method, tokens, **options):
    """The last (sparse) block of ``family`` quantized by ``method`` on ``tokens``: (results, method)."""
    model = _load(models[family], family)
    adapter = family_by_name(family)
    blocks = adapter.block_list(model)
    calib = capture_block_inputs(model, blocks, tokens, 1, torch.device("cpu"))
    last = len(blocks) - 1
    for block in list(blocks)[:last]:
        calib.hidden = calib.run(block)
    quant = build_method(make_config(method, bits=4, group_size=32, **options), adapter, model.config)
    return quant.quantize_block(blocks[last], adapter.block_prefix(last), calib), quant


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].dequantize(torch.float64), b[n].dequantize(torch.float64))
                                        for n in a)


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_all_tokens_calibration_and_its_fallback_agree(models, family, method):
    """All-tokens calibration calibrates every expert (none listed as a fallback) and differs from
    routed calibration; a routed run whose threshold no expert reaches falls back to exactly the
    all-tokens statistics, every expert listed with its token count; experts that did reach it keep
    the routed statistics."""
    tokens = _tokens(6, n=2, length=16)
    every, quant_every = _quantize_last_block(models, family, method, tokens, expert_calibration="all-tokens")
    assert quant_every.calibration_fallbacks == {}
    routed, quant_routed = _quantize_last_block(models, family, method, tokens, expert_calibration="routed")
    experts = [n for n in every if ".mlp.experts." in n]
    assert any(not torch.equal(every[n].dequantize(torch.float64), routed[n].dequantize(torch.float64)) for n in experts)
    # Experts the router skipped use the all-tokens statistics (the default fallback); the others not.
    assert set(quant_routed.calibration_fallbacks) < set(experts)
    assert all(why == "all-tokens: the router sent it no calibration tokens"
               for why in quant_routed.calibration_fallbacks.values())
    fallen, quant_fallen = _quantize_last_block(models, family, method, tokens, expert_calibration="routed",
                                                min_expert_tokens=10**6)
    assert _same_weights(fallen, every)
    assert sorted(quant_fallen.calibration_fallbacks) == sorted(experts)
    assert all(why.startswith("all-tokens: the router sent it ") for why in quant_fallen.calibration_fallbacks.values())
    assert any("fewer than min_expert_tokens=1000000" in why for why in quant_fallen.calibration_fallbacks.values())


def test_expert_options_are_checked_and_reach_the_method_options():
    from qdlm_export.methods import config_class

    for method in ("gptq", "awq"):
        options = make_config(method, expert_calibration="routed", min_expert_tokens=8).method_options()
        assert (options["expert_calibration"], options["min_expert_tokens"], options["expert_fallback"]) == \
            ("routed", 8, "all-tokens")
        for bad in ({"expert_calibration": "some"}, {"expert_fallback": "none"}, {"min_expert_tokens": -1}):
            with pytest.raises(ConfigError):
                make_config(method, **bad)
    with pytest.raises(ConfigError, match="do not apply"):
        make_config("rtn", expert_calibration="routed")  # nothing to calibrate
    assert config_class("gptq")().expert_calibration == "all-tokens"  # the measured default


def test_quantize_survives_a_calibration_that_misses_experts(models, tmp_path):
    out = tmp_path / "few"
    quantize(str(models["lladamoe"]), out, make_config("gptq", bits=4, group_size=32, expert_calibration="routed",
                                                       expert_fallback="rtn"),
             calibration=CalibrationConfig(nsamples=1, seqlen=2, seed=3), trust_remote_code=True, verify=False,
             device="cpu")
    listed = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_modules"]
    assert sum(".mlp.experts." in n for n in listed) == 2 * 8 * 3
    # 2 tokens x top-2 reach at most 4 of each layer's 8 experts: the others fell back to RTN, and the
    # report says which and why.
    fallbacks = json.loads((out / "qdlm_report.json").read_text())["calibration_fallbacks"]
    per_layer = {}
    for name, why in fallbacks.items():
        assert ".mlp.experts." in name and name in listed and "no calibration tokens" in why
        per_layer.setdefault(name.split(".mlp.")[0], set()).add(name.split(".mlp.experts.")[1].split(".")[0])
    assert len(per_layer) == 2 and all(len(experts) >= 4 for experts in per_layer.values())
