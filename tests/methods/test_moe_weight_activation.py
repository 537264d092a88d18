"""Weight-activation methods (RTN-WA, SmoothQuant, QuaRot, DuQuant) on the mixture-of-experts dLLMs
(LLaDA2 ``llada2_moe``, LLaDA-MoE ``lladamoe``, as published: fixtures/published/).

* Every routed expert and shared expert linear is quantized, the router is not; the checkpoint
  reloads with ``from_pretrained`` and computes what a float64 reference computes from its raw tensors
  (docs/FORMAT.md's ops, activation quantizer and dequantized weights, with the published routing).
* The folding step alone (before quantization) changes nothing: the block's output and the router's
  logits equal the original's in float64.
* W4A4 QuaRot and DuQuant beat RTN-WA W4A4 on held-out inputs of outlier variants of both models.

The float64 forward is tests/families/test_moe_models.py's, written from the published code; here each
listed linear goes through the checkpoint's online ops and activation quantizer.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.families import family_by_name
from qdlm_export.fixtures import build_tiny_moe_model
from qdlm_export.methods import build_method
from qdlm_export.methods.base import NO_ROUTED_TOKENS
from qdlm_export.methods.folding import rotate_columns
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.fidelity import prepare_folder_code
from qdlm_export.quantize.pipeline import build_quantized_linear, capture_block_inputs
from tests.families import test_moe_models as moe
from tests.isolation import rel
from tests.reference import dequantized_weights, fake_quant, load_tensors, spec_ops

FAMILIES = ("llada2_moe", "lladamoe")
CALIB = CalibrationConfig(nsamples=4, seqlen=32, seed=0)
DUQUANT = {"block_size": 32, "max_rotation_steps": 16}  # 32 divides hidden 64, experts' 32, dense 128
# The study's DuQuant clips are tuned for 4 bits (docs/METHODS.md): off at 8.
CONFIGS = {
    "rtn-wa-w8a8": ("rtn-wa", {}),
    "smoothquant-w8a8": ("smoothquant", {}),
    "quarot-w8a8": ("quarot", {"bits": 8, "act_bits": 8}),
    "duquant-w8a8": ("duquant", {"bits": 8, "act_bits": 8, "swc": 1.0, "act_clip_ratio": 1.0, **DUQUANT}),
    "rtn-wa-w4a4": ("rtn-wa", {"bits": 4, "act_bits": 4}),
    "quarot-w4a4": ("quarot", {}),
    "duquant-w4a4": ("duquant", DUQUANT),
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny models (LLaDA2: one dense and two sparse layers, a shared expert, GQA, router biases;
    LLaDA-MoE: two sparse layers) and their outlier variants (``outlier_variant``)."""
    root = tmp_path_factory.mktemp("moe-wa")
    found = {"llada2_moe": build_tiny_moe_model("llada2_moe", root / "llada2_moe", router_bias=True),
             "lladamoe": build_tiny_moe_model("lladamoe", root / "lladamoe")}
    for family in FAMILIES:
        found[f"{family}-outliers"] = outlier_variant(found[family], root / f"{family}-outliers")
    return found


# The W4A4 checkpoints are made from the outlier variants, so the quality test reuses them; one W8A8
# checkpoint per family is written without the self-contained loader (qdlm-export's own loads it).
W4A4_TAGS = ("rtn-wa-w4a4", "quarot-w4a4", "duquant-w4a4")
PACKAGE_LOADER_TAG = "smoothquant-w8a8"


def source_of(models, family: str, tag: str) -> Path:
    return models[f"{family}-outliers" if tag in W4A4_TAGS else family]


@pytest.fixture(scope="module")
def written(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-wa-q")

    @functools.cache
    def make(family: str, tag: str) -> Path:
        method, options = CONFIGS[tag]
        out = root / f"{family}-{tag}"
        quantize(str(source_of(models, family, tag)), out, make_config(method, **options), calibration=CALIB,
                 trust_remote_code=True, verify=False, device="cpu", self_contained=tag != PACKAGE_LOADER_TAG)
        return out

    return make


def _load(folder: Path, family: str, dtype: torch.dtype):
    auto = family_by_name(family).auto_class
    prepare_folder_code(folder, auto)
    return getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()


def _ids(seed: int, n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 2000, (n, length), generator=torch.Generator().manual_seed(seed))


# ---- the float64 reference of a weight-activation checkpoint -------------------------------------------


def _quantized_linear(qc: dict, tensors: dict[str, torch.Tensor]):
    """``linear(name, x)``: docs/FORMAT.md's quantized linear on the raw tensors (float64), or a plain
    matmul for a module the checkpoint does not list (the router)."""
    listed, act = set(qc["quantized_modules"]), qc["activations"]
    modules = qc["transforms"]["modules"]

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        weight = tensors[f"{name}.weight"]
        if name not in listed:
            return x @ weight.T
        ops = modules.get(name, [])
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        h = spec_ops(x, ops, own)
        if {"op": "quantize_input"} in ops:
            static = act["granularity"] == "tensor"
            h = fake_quant(h, act["bits"], act["symmetric"], act["clip_ratio"],
                           own["input_scale"] if static else None, own.get("input_zero_point") if static else None)
        y = h @ weight.T
        if {"op": "quantize_output"} in ops:
            y = fake_quant(y, act["qkv_bits"], act["symmetric"], act["clip_ratio"])
        return y

    return linear


def _layer(h, t, i, cfg, family, linear):
    """moe.reference_layer with every linear through ``linear(name, x)``."""
    llada2 = family == "llada2_moe"
    p = f"model.layers.{i}."
    eps, (B, T, H) = cfg["rms_norm_eps"], h.shape
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // heads
    x = moe._rms(h, t[p + "input_layernorm.weight"], eps)
    if llada2:
        qkv = linear(p + "attention.query_key_value", x).view(B, T, heads + 2 * kv, hd)
        q, k, v = qkv.split([heads, kv, kv], dim=2)
        q = moe._rms(q, t[p + "attention.query_layernorm.weight"], eps)
        k = moe._rms(k, t[p + "attention.key_layernorm.weight"], eps)
        out = p + "attention.dense"
    else:
        a = p + "self_attn."
        q = moe._rms(linear(a + "q_proj", x).view(B, T, heads, hd), t[a + "q_norm.weight"], eps)
        k = moe._rms(linear(a + "k_proj", x).view(B, T, kv, hd), t[a + "k_norm.weight"], eps)
        v = linear(a + "v_proj", x).view(B, T, kv, hd)
        out = a + "o_proj"
    rd = int(hd * cfg["partial_rotary_factor"])
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((freqs, freqs), -1).sin()[:, None]
    q, k = moe._rope(q, cos, sin), moe._rope(k, cos, sin)
    k, v = k.repeat_interleave(heads // kv, dim=2), v.repeat_interleave(heads // kv, dim=2)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k).div(math.sqrt(hd)).softmax(-1)
    h = h + linear(out, torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, heads * hd))
    x = moe._rms(h, t[p + "post_attention_layernorm.weight"], eps).reshape(B * T, H)

    def mlp(prefix, x):
        return linear(prefix + "down_proj", torch.nn.functional.silu(linear(prefix + "gate_proj", x))
                      * linear(prefix + "up_proj", x))

    if p + "mlp.gate.weight" not in t:
        return h + mlp(p + "mlp.", x).view(B, T, H)
    idx, weight = moe._route(x, t, p, cfg, llada2)
    y = torch.zeros_like(x)
    for e in range(cfg["num_experts"]):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if len(rows):
            y.index_add_(0, rows, mlp(f"{p}mlp.experts.{e}.", x[rows]) * weight[rows, slot, None])
    shared = p + ("mlp.shared_experts." if llada2 else "shared_expert.")
    if shared + "gate_proj.weight" in t:
        y = y + mlp(shared, x)
    return h + y.view(B, T, H)


def reference_logits(folder: Path, ids: torch.Tensor, family: str) -> torch.Tensor:
    cfg = json.loads((folder / "config.json").read_text())
    t = {k: v.double() if v.is_floating_point() else v for k, v in load_tensors(folder).items()}
    t.update({f"{n}.weight": w.double() for n, w in dequantized_weights(folder).items()})
    linear = _quantized_linear(cfg["quantization_config"], t)
    h = t["model.word_embeddings.weight" if family == "llada2_moe" else "model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        h = _layer(h, t, i, cfg, family, linear)
    return moe._rms(h, t["model.norm.weight"], cfg["rms_norm_eps"]) @ t["lm_head.weight"].T


# ---- every expert quantized, the router kept, the reload computing the format -------------------------------


def _expected_linears(source: Path, family: str) -> list[str]:
    adapter = family_by_name(family)
    keys = set(load_tensors(source))
    layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    return [n for i in range(layers) for n in adapter.stored_linears(i, keys)]


@pytest.mark.parametrize("tag", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_quantizes_every_expert_and_matches_float64(models, written, family, tag):
    """Every expert and shared expert listed (with its activation quantizer), the routers not and
    stored as plain tensors (folded where the method folds into their input); the reload computes
    what the float64 reference computes from the raw tensors. W8A8 checkpoints are reloaded in
    float64 (the format's arithmetic), W4A4 ones in float32 (how they are used)."""
    source_dir, out = source_of(models, family, tag), written(family, tag)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    listed = qc["quantized_modules"]
    assert sorted(listed) == sorted(_expected_linears(source_dir, family))
    cfg = json.loads((source_dir / "config.json").read_text())
    source, stored = load_tensors(source_dir), load_tensors(out)
    sparse = [i for i in range(cfg["num_hidden_layers"]) if f"model.layers.{i}.mlp.gate.weight" in source]
    experts = [n for n in listed if ".mlp.experts." in n]
    shared = [n for n in listed if ".shared_expert" in n]
    assert len(sparse) == 2 and len(experts) == len(sparse) * cfg["num_experts"] * 3
    assert len(shared) == (len(sparse) * 3 if family == "llada2_moe" else 0)
    assert not any(n.endswith(".mlp.gate") for n in listed)
    assert all({"op": "quantize_input"} in qc["transforms"]["modules"][n] for n in listed)
    for i in sparse:  # the routers, in full precision, folded by the methods that fold into their input
        router = f"model.layers.{i}.mlp.gate.weight"
        assert stored[router].dtype == source[router].dtype and router[:-len(".weight")] not in listed
        folded = CONFIGS[tag][0] in ("smoothquant", "quarot", "duquant")
        assert (not torch.equal(stored[router], source[router])) == folded, router
    ids = _ids(3)
    want = reference_logits(out, ids, family)
    model = _load(out, family, torch.float32 if tag in W4A4_TAGS else torch.float64)
    checked, off = _rows_off_the_format(model, out)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    original = moe.reference_logits(source_dir, source, ids, family)
    print(f"{family} {tag}: {sum(off.values())} of {sum(checked.values())} rows off, logits "
          f"{rel(got, want):.1e}, vs float {rel(got, original):.1e}")
    # Every quantized linear that ran (routed experts: those the router chose) computes the format on
    # the inputs it received, to the dense W-A tests' 1e-4 per token -- but for the rare token one of
    # whose activations sits on a rounding boundary (inputs differ by ~1e-7: the routers' float32).
    assert sum(".mlp.experts." in n for n in checked) >= 8
    assert sum(off.values()) <= 0.01 * sum(checked.values()), {n: c for n, c in off.items() if c}
    # ...so the whole model follows the reference.
    assert rel(got, want) <= 5e-3
    assert rel(got, original) > 2 * rel(got, want)  # really quantized


def _rows_off_the_format(model: torch.nn.Module, folder: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per quantized linear that received tokens during one forward: (tokens checked, tokens whose
    output is more than 1e-4 (relative) away from the float64 reference of the raw tensors)."""
    cfg = json.loads((folder / "config.json").read_text())
    t = {k: v.double() if v.is_floating_point() else v for k, v in load_tensors(folder).items()}
    t.update({f"{n}.weight": w.double() for n, w in dequantized_weights(folder).items()})
    linear = _quantized_linear(cfg["quantization_config"], t)
    checked: dict[str, int] = {}
    off: dict[str, int] = {}

    def hook(name):
        def check(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            if len(x):
                want = linear(name, x.double())
                err = (output.reshape(len(x), -1).double() - want).norm(dim=-1) / want.norm(dim=-1)
                checked[name] = checked.get(name, 0) + len(x)
                off[name] = off.get(name, 0) + int((err > 1e-4).sum())
        return check

    names = cfg["quantization_config"]["quantized_modules"]
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(input_ids=_ids(4))
    for handle in handles:
        handle.remove()
    return checked, off


# ---- helpers -------------------------------------------------------------


def _method(folder: Path, family: str, tag: str, **extra):
    method, options = CONFIGS[tag]
    cfg = json.loads((folder / "config.json").read_text())
    return build_method(make_config(method, **{**options, **extra}), family_by_name(family), cfg,
                        scale_dtype=torch.float32, quantized_linear=build_quantized_linear)


def _text_tokens(config: CalibrationConfig) -> torch.Tensor:
    from transformers import AutoTokenizer

    from qdlm_export.fixtures import MASK_ID, tokenizer_dir
    from qdlm_export.quantize.calibration import calibration_tokens

    return calibration_tokens(AutoTokenizer.from_pretrained(tokenizer_dir()), config, MASK_ID)


def outlier_variant(source: Path, out: Path, channels: int = 4, scale: float = 50.0, seed: int = 3) -> Path:
    """``source`` with the outlier channels real LLMs have, as the dense fixtures' ``outlier_channels``
    makes them: ``channels`` residual-stream channels of the embeddings and of every hidden-size norm
    gain (input, post-attention, final) multiplied by ``scale``."""
    if (out / "config.json").is_file():
        return out
    shutil.copytree(source, out)
    tensors = load_file(str(out / "model.safetensors"))
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    picked = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:channels]
    for name, tensor in tensors.items():
        if name.endswith(("embeddings.weight", "embed_tokens.weight")):
            tensor[:, picked] *= scale
        elif name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")):
            assert tensor.shape == (hidden,)
            tensor[picked] *= scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---- folding alone changes nothing ---------------------------------------------------------------------------


@functools.cache
def _float64_model(folder: Path, family: str) -> torch.nn.Module:
    return _load(folder, family, torch.float64)


def _block_tensors(block: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().double().clone() for k, v in block.state_dict().items()}


@pytest.mark.parametrize("method", ["smoothquant", "quarot", "duquant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_folding_preserves_the_sparse_block_and_the_router_logits(models, family, method):
    """The method's folding step (``plan_block``: scales and rotations into norms, previous linears,
    every expert and the router) on the last (sparse) block of the float64 model: the block computes
    what it did (QuaRot: in the rotated basis) and the router's logits are unchanged, to 1e-10. The
    online parts are not applied (they cancel exactly, and are checked by the round trip)."""
    folder = models[family]
    cfg = json.loads((folder / "config.json").read_text())
    model = copy.deepcopy(_float64_model(folder, family))
    quant = _method(folder, family, f"{method}-w8a8" if method != "quarot" else "quarot-w4a4")
    adapter = quant.adapter
    blocks = adapter.block_list(model)
    last = len(blocks) - 1
    prefix = adapter.block_prefix(last)
    h = torch.randn(2, 24, cfg["hidden_size"], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    before = {**load_tensors(folder), **_block_tensors(blocks[last], prefix)}
    before = {k: v.double() for k, v in before.items() if v.is_floating_point()}
    want = moe.reference_layer(h, before, last, cfg, family)
    quant.prepare(model)
    calib = capture_block_inputs(model, blocks, _ids(6, n=2, length=16), 1, torch.device("cpu"))
    for block in list(blocks)[:last]:
        calib.hidden = calib.run(block)
    quant.plan_block(blocks[last], prefix, adapter.block_groups(blocks[last]), calib)
    after = {**before, **_block_tensors(blocks[last], prefix)}
    router = f"{prefix}.mlp.gate.weight"
    assert not torch.equal(after[router], before[router])  # the fold reached the router
    rotate = (lambda x: x) if method != "quarot" else (lambda x: rotate_columns(x, quant.signs))
    got = moe.reference_layer(rotate(h), after, last, cfg, family)
    assert rel(got, rotate(want)) <= 1e-10
    norm = f"{prefix}.post_attention_layernorm.weight"
    eps = cfg["rms_norm_eps"]
    # The router reads the post-attention norm of the residual stream; any stream checks the fold.
    logits_before = moe._rms(h, before[norm], eps) @ before[router].T
    logits_after = moe._rms(rotate(h), after[norm], eps) @ after[router].T
    assert rel(logits_after, logits_before) <= 1e-10


# ---- what the rotations are for ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_rotations_beat_rtn_w4a4_on_held_out_inputs(models, written, family):
    """On the outlier variant of each model (4 residual channels x50, as real LLMs have), the W4A4
    QuaRot and DuQuant checkpoints have a lower relative error of the logits than RTN-WA W4A4's, on
    held-out masked text (calibration: seed 0; held out: seed 7)."""
    folder = models[f"{family}-outliers"]
    ids = _text_tokens(CalibrationConfig(nsamples=8, seqlen=32, seed=7, masking="random"))
    with torch.no_grad():
        ref = _load(folder, family, torch.float32)(input_ids=ids).logits
        errors = {tag: rel(_load(written(family, tag), family, torch.float32)(input_ids=ids).logits, ref)
                  for tag in W4A4_TAGS}
    print(f"\n{family} W4A4 held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
    assert errors["quarot-w4a4"] < errors["rtn-wa-w4a4"] and errors["duquant-w4a4"] < errors["rtn-wa-w4a4"], errors


# ---- experts the calibration never reaches ----------------------------------------------------------------------


def _quantize_last_block(folder: Path, family: str, tokens: torch.Tensor, **options):
    model = _load(folder, family, torch.float32)
    quant = _method(folder, family, "smoothquant-w8a8", act_granularity="tensor", **options)
    blocks = quant.adapter.block_list(model)
    quant.prepare(model)
    calib = capture_block_inputs(model, blocks, tokens, 1, torch.device("cpu"))
    last = len(blocks) - 1
    for block in list(blocks)[:last]:
        calib.hidden = calib.run(block)
    return quant.quantize_block(blocks[last], quant.adapter.block_prefix(last), calib), quant


@pytest.mark.parametrize("family", FAMILIES)
def test_silent_experts_fall_back_to_all_token_statistics(models, family):
    """Routed calibration on two tokens (top-2 of 8 experts: at least four experts get none): every
    expert is still quantized, with static input scales; the silent ones are listed in
    ``calibration_fallbacks`` and quantized exactly as all-token calibration quantizes them (same
    smoothing, weights and scales), while the experts that got tokens use their own."""
    tokens = _ids(5, n=1, length=2)
    routed, quant_routed = _quantize_last_block(models[family], family, tokens, expert_calibration="routed")
    every, quant_every = _quantize_last_block(models[family], family, tokens)
    experts = [n for n in routed if ".mlp.experts." in n]
    assert len(experts) == 3 * 8 and quant_every.calibration_fallbacks == {}
    fallen = set(quant_routed.calibration_fallbacks)
    assert fallen < set(experts) and len({n.split(".mlp.experts.")[1].split(".")[0] for n in fallen}) >= 4
    assert all(why == f"all-tokens: {NO_ROUTED_TOKENS}" for why in quant_routed.calibration_fallbacks.values())

    def same(a, b) -> bool:
        extra_a, extra_b = a.extra_tensors, b.extra_tensors
        weights_equal = torch.equal(a.dequantize(torch.float64), b.dequantize(torch.float64))
        return weights_equal and extra_a.keys() == extra_b.keys() and all(torch.equal(extra_a[k], extra_b[k])
                                                                          for k in extra_a)

    assert all("input_scale" in routed[n].extra_tensors for n in experts)
    assert all(same(routed[n], every[n]) for n in fallen)
    assert not all(same(routed[n], every[n]) for n in set(experts) - fallen)


def test_a_router_without_a_foldable_weight_is_refused(models):
    """A router whose weight the input transform cannot be folded into (here: wrapped so that it has
    no ``weight [experts, hidden]``) is refused with a ConfigError naming it, not silently left
    reading an untransformed input."""
    from qdlm_export.errors import ConfigError

    folder = models["lladamoe"]
    model = _load(folder, "lladamoe", torch.float32)
    quant = _method(folder, "lladamoe", "quarot-w4a4", weight_method="rtn")
    block = quant.adapter.block_list(model)[0]
    block.mlp.gate = torch.nn.Sequential(block.mlp.gate)
    with pytest.raises(ConfigError, match="router mlp.gate has no weight") as info:
        quant.plan_block(block, quant.adapter.block_prefix(0), quant.adapter.block_groups(block), None)
    assert "rtn-wa" in (info.value.hint or "")
