"""DiffusionGemma as compressed-tensors, laid out for vLLM (docs/EXPORTS.md, "DiffusionGemma").

The converting sink of ``quantize --format compressed-tensors`` receives what the pipeline hands it for
DiffusionGemma: RTN results for every linear of the decoder's layers, the routed experts as the
unfused view's per-expert linears (``...experts.E.gate_proj`` [I, H] sliced from the stored 3-D
``experts.gate_up_proj``), and every other stored tensor unchanged (the 3-D float experts excepted). The
native side of the same run (``StackingSink`` + ``build_quantization_config``) gives the native
``quantization_config`` the sink finishes with, as in ``quantize/api.py``.

Independent references:

* vLLM's weight loading for DiffusionGemma, encoded below from its source (``vllm_targets``): which
  parameter of vLLM's model each tensor name lands in;
* compressed-tensors' own decompressor, against the float64 dequantization of the RTN results;
* the published config.json (the fixture writes the published key set) and generation_config.json;
* transformers, loading the export once an expert conversion is registered (stock transformers
  cannot: ``test_stock_transformers_cannot_load_fused_experts``), against a float64 model whose
  weights are the dequantized RTN results.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qdlm_export.core.schemes import WeightScheme, quantize_rtn
from qdlm_export.errors import ConfigError
from qdlm_export.exports.convert import check_convertible, convert
from qdlm_export.exports.streaming import ConvertingSink
from qdlm_export.families.diffusion_gemma import DIFFUSION_GEMMA
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.format.config_schema import build_quantization_config
from qdlm_export.format.model_files import copyable_model_files
from qdlm_export.format.stacked_experts import StackingSink, shared_stack_section
from qdlm_export.format.writer import ShardedWriter, TeeSink
from tests.isolation import BLOCKER, rel, run_isolated
from tests.reference import load_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_LINEAR = re.compile(r"^model\.decoder\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
# (scale dtype, group size): float32 scales make the dequantized weights exact in every library's
# arithmetic (the logits check); float16 is what half-precision models store.
SCHEMES = {"fp32-g64": (torch.float32, 64), "fp16-g32": (torch.float16, 32)}


class Export:
    """A tiny DiffusionGemma (``src``), the native checkpoint (``native``: stacked experts) and the
    compressed-tensors export (``out``) of one run, and the RTN results the sinks received, by linear
    name (``qweights``)."""

    def __init__(self, src: Path, native: Path, out: Path, qweights: dict, config: dict, seed: int):
        self.src, self.native, self.out, self.qweights, self.config = src, native, out, qweights, config
        self.seed = seed  # the fixture's: named in failure messages, to rebuild the same model
        self.tensors = load_tensors(out)
        self.exported_config = json.loads((out / "config.json").read_text())
        self.qc = self.exported_config["quantization_config"]


def _export(root: Path, seed: int, scale_dtype: torch.dtype, group_size: int) -> Export:
    src = build_tiny_diffusion_gemma(root / "src", seed=seed)
    config = json.loads((src / "config.json").read_text())
    experts = config["text_config"]["num_experts"]
    scheme = WeightScheme(bits=4, group_size=group_size, symmetric=True)
    weights = {"bits": 4, "group_size": group_size, "symmetric": True,
               "scale_dtype": str(scale_dtype).removeprefix("torch.")}
    native, out = root / "native", root / "export"
    native.mkdir()
    out.mkdir()
    export = ConvertingSink(out, "compressed-tensors", {"weights": weights, "activations": None})
    stacking = StackingSink(ShardedWriter(native), DIFFUSION_GEMMA, experts)
    sink = TeeSink(stacking, export)
    qweights: dict = {}

    def linear(name: str, weight: torch.Tensor) -> None:
        qweights[name] = quantize_rtn(weight.contiguous(), scheme, scale_dtype)
        sink.add_linear(name, qweights[name])

    with safe_open(src / "model.safetensors", "pt") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            if _LINEAR.match(key):
                linear(key.removesuffix(".weight"), tensor)
            elif key.endswith(".experts.gate_up_proj"):  # [E, 2I, H]: the gate rows, then the up rows
                module, inter = key.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
                for e in range(experts):
                    linear(f"{module}.{e}.gate_proj", tensor[e, :inter])
                    linear(f"{module}.{e}.up_proj", tensor[e, inter:])
            elif key.endswith(".experts.down_proj"):  # [E, H, I]
                module = key.removesuffix(".down_proj")
                for e in range(experts):
                    linear(f"{module}.{e}.down_proj", tensor[e])
            else:
                sink.add_tensor(key, tensor)
    fused = stacking.finish()
    stacking.inner.close()
    export.close()
    qconfig = build_quantization_config(
        method="rtn", method_options={}, weights=weights, activations=None, family="diffusion_gemma",
        mask_token_id=None, logits_shift=False, quantized_modules=list(qweights), module_overrides={},
        modules_not_converted=[], transforms={}, calibration=None, provenance={"tool": "qdlm-export"},
        fused_experts=fused, shared_stack=shared_stack_section(DIFFUSION_GEMMA))
    for f in copyable_model_files(src):
        shutil.copy2(f, native / f.name)
    (native / "config.json").write_text(json.dumps(dict(config, quantization_config=qconfig), indent=2))
    export.finish(native, qconfig, repo_id="tiny-diffusion-gemma-ct")
    return Export(src, native, out, qweights, config, seed)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``exports(key)``: the export of scheme ``SCHEMES[key]``, built once per module from a fresh seed."""
    built: dict[str, Export] = {}

    def get(key: str) -> Export:
        if key not in built:
            scale_dtype, group_size = SCHEMES[key]
            built[key] = _export(tmp_path_factory.mktemp(key), random.randrange(1 << 30), scale_dtype, group_size)
        return built[key]

    return get


@pytest.fixture(params=list(SCHEMES))
def dg(request, exports) -> Export:
    return exports(request.param)


# ---------------------------------------------------------------------------------------------
# vLLM's loader, from its source
# ---------------------------------------------------------------------------------------------
# vllm-project/vllm, vllm/model_executor/models/diffusion_gemma.py at cdc8ad9ad156349372e1f05e9e259633c7093601
# (DiffusionGemmaForConditionalGeneration.load_weights): the self-conditioning MLP and the vision
# tower/embedder are copied by name; the encoder's and the decoder's text weights both land in one
# Gemma 4 backbone "model." (the first name seen wins), then Gemma4ForCausalLM.load_weights
# (vllm/model_executor/models/gemma4.py at 001cabc1be16a59a70d720ed61a13b678c060a18) renames
# ".router.per_expert_scale" to ".moe.per_expert_scale" and ".experts.E." to ".moe.experts.E.",
# gives the full-attention layers' k_proj tensors to v_proj as well (attention_k_eq_v), and
# Gemma4Model.load_weights routes q/k/v into qkv_proj and the dense gate/up into gate_up_proj
# (stacked_params_mapping), the experts' gate/up into FusedMoE's w13_* and down into w2_* by prefix
# ("experts.E.gate_proj." -> "experts.w13_"): per-expert 2-D tensors, whatever their suffix.
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")  # CT pack-quantized, symmetric


def _vllm_prefix(name: str) -> str | None:
    for hf, vllm in (("model.encoder.language_model.", "model."), ("model.decoder.", "model."),
                     ("model.encoder.vision_tower.", "vision_tower."), ("model.encoder.embed_vision.", "embed_vision.")):
        if name.startswith(hf):
            return vllm + name[len(hf):]
    return None


def vllm_targets(name: str, full_layers: set[int]) -> list[tuple[str, object, int | None]]:
    """``(vLLM parameter, shard, expert)`` that the checkpoint tensor ``name`` is loaded into."""
    if name.startswith("model.decoder.self_conditioning."):
        return [("self_conditioning." + name.split("self_conditioning.", 1)[1], None, None)]
    mapped = _vllm_prefix(name)
    assert mapped is not None, f"vLLM's DiffusionGemma loader has no place for {name}"
    if mapped.startswith(("vision_tower.", "embed_vision.")):
        return [(mapped, None, None)]
    mapped = mapped.replace(".router.per_expert_scale", ".moe.per_expert_scale")
    mapped = re.sub(r"\.experts\.(\d+)\.", r".moe.experts.\1.", mapped)
    names = [mapped]
    layer = re.search(r"layers\.(\d+)\.", mapped)
    if "self_attn.k_proj" in mapped and layer and int(layer.group(1)) in full_layers:
        names.append(mapped.replace("k_proj", "v_proj"))
    targets = []
    for n in names:
        stacked = re.match(r"(.*\.self_attn\.)([qkv])_proj\.(.*)$", n) or re.match(r"(.*\.mlp\.)(gate|up)_proj\.(.*)$", n)
        expert = re.match(r"(.*\.moe\.experts\.)(\d+)\.(gate|up|down)_proj\.(.*)$", n)
        if expert:
            prefix, e, proj, suffix = expert.groups()
            group = "w2_" if proj == "down" else "w13_"
            targets.append((f"{prefix}{group}{suffix}", {"gate": "w1", "up": "w3", "down": "w2"}[proj], int(e)))
        elif stacked and ".self_attn." in n:
            targets.append((f"{stacked.group(1)}qkv_proj.{stacked.group(3)}", stacked.group(2), None))
        elif stacked:
            targets.append((f"{stacked.group(1)}gate_up_proj.{stacked.group(3)}", 0 if stacked.group(2) == "gate" else 1,
                            None))
        else:
            targets.append((n, None, None))
    return targets


def vllm_parameters(config: dict, hf_names: list[str]) -> dict[str, set]:
    """vLLM's DiffusionGemma parameters for a compressed-tensors W4A16 symmetric checkpoint, each with
    the (shard, expert) parts that must all be loaded: Gemma4DecoderLayer with qkv_proj, o_proj,
    mlp.{gate_up,down}_proj (CT linears), router (proj, scale), moe (per_expert_scale, FusedMoE
    experts w13_/w2_ with CT's pack-quantized parameters), norms and layer_scalar; the embeddings and
    final norm; the self-conditioning MLP and the Hugging Face vision tower/embedder, by their names."""
    text = config["text_config"]
    experts = range(text["num_experts"])
    params: dict[str, set] = {"model.embed_tokens.weight": {None}, "model.norm.weight": {None}}
    for i in range(text["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for s in CT_SUFFIXES:
            params[f"{p}self_attn.qkv_proj.{s}"] = {"q", "k", "v"}
            params[f"{p}self_attn.o_proj.{s}"] = {None}
            params[f"{p}mlp.gate_up_proj.{s}"] = {0, 1}
            params[f"{p}mlp.down_proj.{s}"] = {None}
            params[f"{p}moe.experts.w13_{s}"] = {(w, e) for w in ("w1", "w3") for e in experts}
            params[f"{p}moe.experts.w2_{s}"] = {("w2", e) for e in experts}
        for n in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "router.proj.weight", "router.scale",
                  "moe.per_expert_scale", "layer_scalar", "input_layernorm.weight", "post_attention_layernorm.weight",
                  "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
                  "pre_feedforward_layernorm_2.weight", "post_feedforward_layernorm_1.weight",
                  "post_feedforward_layernorm_2.weight"):
            params[p + n] = {None}
    for n in ("pre_norm.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        params[f"self_conditioning.{n}"] = {None}
    for n in hf_names:  # the vision tower is transformers' own module in vLLM: the same names
        if n.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")):
            params[_vllm_prefix(n)] = {None}
    return params


def _full_layers(config: dict) -> set[int]:
    return {i for i, kind in enumerate(config["text_config"]["layer_types"]) if kind == "full_attention"}


def test_every_tensor_lands_where_vllm_loads_it(dg):
    source_names = list(load_tensors(dg.src))
    expected = vllm_parameters(dg.config, source_names)
    loaded: dict[str, set] = {}
    for name in dg.tensors:
        for param, shard, expert in vllm_targets(name, _full_layers(dg.config)):
            assert param in expected, f"{name} -> {param}: vLLM's DiffusionGemma has no such parameter"
            loaded.setdefault(param, set()).add(shard if expert is None else (shard, expert))
    assert loaded == expected  # every parameter, every q/k/v shard and every expert's w1/w3/w2
    # vLLM explodes 3-D experts only as float weights: the quantized export must not carry them
    assert not [n for n in dg.tensors if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]


def test_per_expert_tensors_have_compressed_tensors_layout(dg):
    text = dg.config["text_config"]
    hidden, inter, group = text["hidden_size"], text["moe_intermediate_size"], dg.qc["config_groups"]["group_0"]["weights"]
    for e in (0, text["num_experts"] - 1):
        for proj, (out, inp) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                 ("down_proj", (hidden, inter))):
            name = f"model.decoder.layers.1.experts.{e}.{proj}"
            packed, scale = dg.tensors[f"{name}.weight_packed"], dg.tensors[f"{name}.weight_scale"]
            assert packed.dtype == torch.int32 and tuple(packed.shape) == (out, inp * 4 // 32)
            assert tuple(scale.shape) == (out, inp // group["group_size"])
            assert dg.tensors[f"{name}.weight_shape"].tolist() == [out, inp]


def test_config_targets_every_linear_and_ignores_exactly_the_float_ones(dg):
    assert dg.qc["quant_method"] == "compressed-tensors" and dg.qc["format"] == "pack-quantized"
    groups = dg.qc["config_groups"]
    assert list(groups) == ["group_0"] and groups["group_0"]["targets"] == ["Linear"]
    assert groups["group_0"]["weights"]["symmetric"] and groups["group_0"]["weights"]["num_bits"] == 4
    # vLLM maps ignore entries with the model's hf_to_vllm_mapper and matches them exactly
    # (compressed_tensors/utils.py should_ignore_layer at 008014e8503b206a8ae3eb9d17fd46b48b8d2606).
    ignore = {_vllm_prefix(n) or n for n in dg.qc["ignore"]}
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(dg.src))
    float_linears = {_vllm_prefix(n) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith(("model.encoder.vision_tower.",
                                                                          "model.encoder.embed_vision."))}
    assert float_linears and float_linears <= ignore  # vLLM gives the vision tower the checkpoint's quant config
    quantized_shards = {f"model.layers.{i}.{n}" for i in range(dg.config["text_config"]["num_hidden_layers"])
                        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "moe.experts.0.gate_proj",
                                  "moe.experts.0.up_proj", "moe.experts.0.down_proj")}
    assert not quantized_shards & ignore
    assert not [n for n in dg.qc["ignore"] if n.startswith("re:")]


def test_compressed_tensors_decompresses_to_the_dequantized_weights(dg):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    ct_config = QuantizationConfig.model_validate(dg.qc)
    scheme = ct_config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    assert set(dg.qweights) == {n.rsplit(".", 1)[0] for n in dg.tensors if n.endswith(".weight_packed")}
    for name, qweight in dg.qweights.items():
        state = {s: dg.tensors[f"{name}.{s}"] for s in CT_SUFFIXES}
        weight = compressor.decompress(state, scheme)["weight"]
        reference = qweight.dequantize(torch.float64)
        assert weight.dtype == qweight.scale.dtype, name
        assert torch.equal(weight, reference.to(weight.dtype)), f"{name} (fixture seed {dg.seed})"


def test_config_is_the_published_one_plus_quantization_config(dg):
    published = json.loads((dg.src / "config.json").read_text())
    assert {k: v for k, v in dg.exported_config.items() if k != "quantization_config"} == published
    for key in ("global_head_dim", "num_global_key_value_heads"):  # what transformers would not write back
        assert key in dg.exported_config["text_config"]
    assert (dg.out / "generation_config.json").read_bytes() == (dg.src / "generation_config.json").read_bytes()
    report = json.loads((dg.out / "qdlm_report.json").read_text())
    native = report["export"]["native_quantization_config"]
    assert native["quant_method"] == "qdlm" and "fused_experts" in native
    card = (dg.out / "README.md").read_text()
    assert "vllm serve" in card


def test_convert_of_the_native_checkpoint_writes_the_same_export(dg, tmp_path):
    """``convert DIR`` reads the native checkpoint's stacked experts back as per-expert slices: the same
    tensors, config and report as the export ``quantize --format`` streamed from memory."""
    converted = convert(dg.native, tmp_path / "converted", "compressed-tensors")
    tensors = load_tensors(converted)
    assert sorted(tensors) == sorted(dg.tensors)
    for name, tensor in dg.tensors.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    assert json.loads((converted / "config.json").read_text()) == dg.exported_config


def test_a_run_that_stacked_nothing_is_still_refused_what_vllm_cannot_load(exports, tmp_path):
    """Without a native checkpoint (``--no-verify``) no stacking sink records ``fused_experts``: the sink
    knows the family's fused experts from the model's config and still refuses mixed schemes."""
    dg = exports("fp16-g32")
    native = tmp_path / "native"
    native.mkdir()
    qconfig = json.loads((dg.native / "config.json").read_text())["quantization_config"]
    qconfig.pop("fused_experts")
    down = next(n for n in dg.qweights if n.endswith(".experts.0.down_proj"))
    qconfig.update(quantized_modules=list(dg.qweights), module_overrides={down: {"group_size": -1}})
    (native / "config.json").write_text(json.dumps(dict(dg.config, quantization_config=qconfig)))
    (tmp_path / "out").mkdir()
    sink = ConvertingSink(tmp_path / "out", "compressed-tensors", {"weights": qconfig["weights"], "activations": None})
    for name, qweight in dg.qweights.items():
        sink.add_linear(name, qweight)
    sink.close()
    with pytest.raises(ConfigError, match="different schemes"):
        sink.finish(native, qconfig, repo_id="refused")
    assert not (tmp_path / "out" / "config.json").exists()


def test_refusals_name_what_vllm_cannot_load():
    fused = {"model.decoder.layers.0.experts": {"num_experts": 2}}
    experts = [f"model.decoder.layers.0.experts.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    base = {"weights": {"bits": 4, "group_size": 64, "symmetric": True, "scale_dtype": "float16"},
            "quantized_modules": ["model.decoder.layers.0.mlp.down_proj", *experts], "fused_experts": fused}
    check_convertible(base, "compressed-tensors")  # 4-bit symmetric, one scheme: fine
    cases = {
        "3-bit": dict(base, weights=dict(base["weights"], bits=3)),
        "asymmetric": dict(base, weights=dict(base["weights"], symmetric=False)),
        "different schemes": dict(base, module_overrides={experts[2]: {"group_size": -1}}),
        "another scheme than the rest": dict(base, module_overrides={"model.decoder.layers.0.mlp.down_proj":
                                                                      {"group_size": -1}}),
        "quantizes activations": dict(base, activations={"bits": 8, "granularity": "token", "symmetric": True}),
    }
    for reason, qconfig in cases.items():
        with pytest.raises(ConfigError, match=reason):
            check_convertible(qconfig, "compressed-tensors")
    # without fused experts the same schemes convert (transformers loads per-expert Linears)
    check_convertible({k: v for k, v in cases["3-bit"].items() if k != "fused_experts"}, "compressed-tensors")
    for fmt in ("gptq", "awq"):  # no loader of theirs was checked with fused experts
        with pytest.raises(ConfigError, match="compressed-tensors"):
            check_convertible(base, fmt)
        check_convertible({k: v for k, v in base.items() if k != "fused_experts"}, fmt)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------

_STOCK = BLOCKER + """
import sys
from transformers import AutoModelForImageTextToText
try:
    AutoModelForImageTextToText.from_pretrained(sys.argv[1])
except AttributeError as exc:  # the tied encoder's Linear lost its `weight` to compressed-tensors
    print("stock-error", exc)
print("isolated-ok")
"""

_REGISTERED = BLOCKER + """
import sys, torch
from transformers import AutoModelForImageTextToText, CompressedTensorsConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

# What transformers has for qwen2_moe-style checkpoints, registered for diffusion_gemma: per-expert
# weights stacked into the 3-D parameters (gate rows, then up rows).
register_checkpoint_conversion_mapping("diffusion_gemma", [
    WeightConverter(["experts.*.gate_proj.weight", "experts.*.up_proj.weight"], "experts.gate_up_proj",
                    operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
    WeightConverter("experts.*.down_proj.weight", "experts.down_proj", operations=[MergeModulelist(dim=0)]),
])
model = AutoModelForImageTextToText.from_pretrained(
    sys.argv[1], quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(**inputs).logits
torch.save(logits, sys.argv[3])
print("isolated-ok")
"""


def test_stock_transformers_cannot_load_fused_experts(exports, tmp_path):
    """transformers 5.24 + compressed-tensors 0.20.1 (docs/EXPORTS.md says why): the compressed
    Linears of the tied encoder stack have no `weight` to tie, and no conversion stacks the per-expert
    tensors into DiffusionGemmaTextExperts' 3-D parameters. When this fails, transformers learned to:
    docs/EXPORTS.md and the model card (compressed_tensors.py) must say so."""
    output = run_isolated(_STOCK, [str(exports("fp16-g32").out)], tmp_path)
    assert "stock-error" in output and "has no attribute `weight`" in output


def test_transformers_with_an_expert_conversion_computes_the_dequantized_model(exports, tmp_path):
    from transformers import AutoModelForImageTextToText

    dg = exports("fp32-g64")  # float32 scales: every library's dequantized weight is exact
    text = dg.config["text_config"]
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    context = torch.randint(0, 2000, (2, 12), generator=gen)
    canvas = torch.randint(0, text["vocab_size"], (2, dg.config["canvas_length"]), generator=gen)
    inputs = {"input_ids": context, "decoder_input_ids": canvas,
              "self_conditioning_logits": torch.randn(2, dg.config["canvas_length"], text["vocab_size"], generator=gen)}
    torch.save(inputs, tmp_path / "inputs.pt")
    run_isolated(_REGISTERED, [str(dg.out), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")], tmp_path)
    got = torch.load(tmp_path / "logits.pt")

    # float64: the eager expert loop (torch's grouped GEMM has no float64)
    reference = AutoModelForImageTextToText.from_pretrained(dg.src, dtype=torch.float64,
                                                            experts_implementation="eager").eval()
    weights = {n: q.dequantize(torch.float64) for n, q in dg.qweights.items()}
    with torch.no_grad():
        for name, module in reference.named_modules():
            if f"{name}" in weights:
                module.weight.copy_(weights[name])
            if name.endswith(".experts") and f"{name}.0.gate_proj" in weights:
                for e in range(text["num_experts"]):
                    module.gate_up_proj[e].copy_(torch.cat([weights[f"{name}.{e}.gate_proj"],
                                                            weights[f"{name}.{e}.up_proj"]]))
                    module.down_proj[e].copy_(weights[f"{name}.{e}.down_proj"])
        want = reference(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).logits
        source = AutoModelForImageTextToText.from_pretrained(dg.src, dtype=torch.float64,
                                                             experts_implementation="eager").eval()
        unquantized = source(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).logits
    assert rel(got, want) <= 1e-5, f"fixture seed {dg.seed}"  # measured 1.9e-6 (float32 against float64)
    assert rel(unquantized, want) > 1e-3  # the reference is the quantized model, not the source (measured 0.65)
