"""Exports of the mixture-of-experts dLLMs (LLaDA2 ``llada2_moe``, LLaDA-MoE ``lladamoe``), checked by
code that is not the exporter.

* compressed-tensors: every export is loaded by stock transformers + compressed-tensors with the
  model's published remote code, in a process where ``import qdlm_export`` fails; its logits are
  compared with the native loader's, and the modules compressed-tensors quantized (those it gave a
  ``quantization_scheme``) must be exactly the native checkpoint's: every routed and shared expert,
  never the router (LLaDA-MoE's router *is* an ``nn.Linear``; LLaDA2's is not). The router's weight
  and LLaDA2's persistent ``expert_bias`` buffer must arrive unchanged.
* GPTQ / AWQ: the tensors are unpacked by the independent unpackers of test_export_formats.py and
  must equal the native dequantized weights exactly; which linears a loader would replace is
  computed with the loaders' own selection rules (optimum's suffix rule for GPTQ, transformers'
  ``should_convert_module`` for AWQ, vLLM's substring rule for both) on the float model's modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qdlm_export  # noqa: F401  (registers the native loader in this process)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.core.schemes import WeightScheme
from qdlm_export.errors import ConfigError
from qdlm_export.exports.awq import FORMAT as AWQ
from qdlm_export.exports.convert import convert
from qdlm_export.exports.export_format import ExportInventory
from qdlm_export.exports.gptq import FORMAT as GPTQ
from qdlm_export.exports.quantized_module import planned_module
from qdlm_export.families import family_by_name
from qdlm_export.quantize.api import make_config, quantize
from tests.exports.test_export_formats import awq_dequantize, gptq_dequantize
from tests.families.test_moe_models import _load, _tokens, models  # noqa: F401  (models: a fixture)
from tests.isolation import BLOCKER, rel, run_isolated
from tests.reference import dequantized_weights, load_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("llada2_moe", "lladamoe")
METHODS = ("rtn", "gptq", "awq")
CALIB = CalibrationConfig(nsamples=4, seqlen=32, seed=0)
TOKENS = _tokens(11)
MOE_REFUSAL = "does not support mixture-of-experts layers yet"


def _w4(method: str):
    # symmetric (compressed-tensors' W4A16 preset: its default load path); float16 scales: what GPTQ/AWQ store
    return make_config(method, bits=4, group_size=32, symmetric=True, scale_dtype="float16")


@pytest.fixture(scope="module")
def native(models, tmp_path_factory):  # noqa: F811
    """(family, method) -> a native W4 g32 checkpoint, quantized on first use."""
    root = tmp_path_factory.mktemp("moe-native")
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, method: str) -> Path:
        if (family, method) not in made:
            out = root / f"{family}-{method}"
            quantize(str(models[family]), out, _w4(method), calibration=CALIB, trust_remote_code=True,
                     verify=False, device="cpu")
            made[family, method] = out
        return made[family, method]

    return get


@pytest.fixture(scope="module")
def float_models(models):  # noqa: F811
    return {family: _load(models[family], family) for family in FAMILIES}


def _native_logits(folder: Path, family: str) -> torch.Tensor:
    with torch.no_grad():
        return _load(folder, family)(input_ids=TOKENS).logits.double()


def _quantized(folder: Path) -> list[str]:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["quantized_modules"]


def _routers(model: torch.nn.Module, family: str) -> list[str]:
    router = family_by_name(family).router
    return [n for n, _ in model.named_modules() if n.endswith("." + router)]


# ---------------------------------------------------------------------------------------------
# compressed-tensors: stock transformers with the published remote code, qdlm_export not importable
# ---------------------------------------------------------------------------------------------

CT_MOE_LOADER = BLOCKER + """
import json, sys, torch
import transformers

jobs = json.loads(sys.argv[1])
tokens = torch.load(sys.argv[2])
for job in jobs:
    # asymmetric pack-quantized loads only dequantized (upstream limitation, docs/EXPORTS.md)
    kwargs = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if job["dequantize"] else {}
    model = getattr(transformers, job["auto_class"]).from_pretrained(job["folder"], dtype=torch.float32,
                                                                     trust_remote_code=True, **kwargs)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    quantized = sorted(n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    kept = {n + "." + k: v for n, m in model.named_modules() if n.endswith(".mlp.gate")
            for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))}
    linear_routers = sorted(n for n, m in model.named_modules() if n.endswith(".mlp.gate")
                            and isinstance(m, torch.nn.Linear))
    torch.save({"logits": logits, "router_tensors": kept}, job["out"])
    with open(job["out"] + ".json", "w") as f:
        json.dump({"quantized": quantized, "linear_routers": linear_routers, "class": type(model).__name__}, f)
leaked = sorted(k for k in sys.modules if k.startswith("qdlm_export"))
assert not leaked, leaked
print("isolated-ok")
"""


def _ct_job(folder: Path, family: str, work: Path, name: str) -> dict:
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    return {"folder": str(folder), "auto_class": family_by_name(family).auto_class, "out": str(work / f"{name}.pt"),
            "dequantize": any(not g["weights"]["symmetric"] for g in groups)}


def _w8a8_native(models, root: Path) -> tuple[Path | None, str]:  # noqa: F811
    """rtn-wa W8A8 of LLaDA2, or (None, why) while the method refuses mixture-of-experts models."""
    out = root / "llada2_moe-w8a8"
    try:
        quantize(str(models["llada2_moe"]), out, make_config("rtn-wa", bits=8, group_size=-1, scale_dtype="float16"),
                 calibration=CALIB, trust_remote_code=True, verify=False, device="cpu")
    except ConfigError as exc:
        if MOE_REFUSAL not in str(exc):
            raise
        return None, str(exc)
    return out, ""


@pytest.fixture(scope="module")
def ct_loaded(models, native, tmp_path_factory):  # noqa: F811
    """case -> (native folder, export folder, what the isolated process saw); every export is loaded
    in one process. Cases: (family, method) W4A16, and "w8a8" (LLaDA2, rtn-wa) when it can be made."""
    work = tmp_path_factory.mktemp("moe-ct")
    sources = {(family, method): (family, native(family, method)) for family in FAMILIES for method in METHODS}
    w8a8, why = _w8a8_native(models, work)
    if w8a8 is not None:
        sources["w8a8"] = ("llada2_moe", w8a8)
    folders, jobs = {}, []
    for i, (case, (family, src)) in enumerate(sources.items()):
        folders[case] = convert(src, work / f"ct-{i}", "compressed-tensors")
        jobs.append(_ct_job(folders[case], family, work, f"ct-{i}"))
    torch.save(TOKENS, work / "tokens.pt")
    run_isolated(CT_MOE_LOADER, [json.dumps(jobs), str(work / "tokens.pt")], work)
    seen = {case: (sources[case][1], folders[case],
                   {**torch.load(job["out"]), **json.loads(Path(job["out"] + ".json").read_text())})
            for case, job in zip(sources, jobs)}
    seen["w8a8-refused"] = why
    return seen


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_tensors_moe_loads_in_stock_transformers(family, method, models, ct_loaded):  # noqa: F811
    src, _, got = ct_loaded[family, method]
    err = rel(got["logits"], _native_logits(src, family))
    assert err <= 1e-3, f"{family} {method}: compressed-tensors vs native {err:.2e}"  # measured 0.0
    # compressed-tensors quantized exactly the native checkpoint's modules: every expert, no router
    quantized = _quantized(src)
    assert got["quantized"] == sorted(quantized)
    cfg = json.loads((models[family] / "config.json").read_text())
    sparse = cfg["num_hidden_layers"] - (1 if family == "llada2_moe" else 0)
    assert sum(".mlp.experts." in n for n in quantized) == sparse * cfg["num_experts"] * 3
    assert sum(".shared_experts." in n for n in quantized) == (sparse * 3 if family == "llada2_moe" else 0)
    assert not [n for n in quantized if n.endswith(".mlp.gate")]
    # LLaDA-MoE's router is an nn.Linear left in float (listed in `ignore`); LLaDA2's is not a Linear
    assert len(got["linear_routers"]) == (sparse if family == "lladamoe" else 0)
    # the router's weight, and LLaDA2's persistent expert_bias buffer, arrive as the source has them
    source = load_tensors(models[family])
    router_keys = sorted(k for k in source if ".mlp.gate." in k)
    assert sorted(got["router_tensors"]) == router_keys
    for key in router_keys:
        assert torch.equal(got["router_tensors"][key], source[key]), key
    if family == "llada2_moe":
        assert any(source[k].abs().sum() > 0 for k in router_keys if k.endswith("expert_bias"))  # not zeros


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_tensors_moe_config_and_files(family, models, ct_loaded):  # noqa: F811
    _, out, seen = ct_loaded[family, "rtn"]
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]
    assert set(seen["linear_routers"]) <= set(qc["ignore"])  # a Linear router must be ignored
    assert "lm_head" in qc["ignore"]
    tensors, source = load_tensors(out), load_tensors(models[family])
    for key in (k for k in source if ".mlp.gate." in k):
        assert torch.equal(tensors[key], source[key]), key
    # the published code needs transformers-5 repairs: the export carries them (and no qdlm loader)
    assert (out / "qdlm_compat.py").is_file() and not (out / "qdlm_loader.py").exists()
    for name in config["auto_map"].values():
        text = (out / (name.rsplit(".", 1)[0] + ".py")).read_text()
        assert text.rstrip().endswith("_qdlm_repair_module(globals())")
        assert "register_with_transformers" not in text
    assert f"{family_by_name(family).auto_class}.from_pretrained" in (out / "README.md").read_text()


def ct_activation(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic symmetric int8 "token" quantization of an input, as its
    ``compute_dynamic_scales_and_zp`` does it: one scale per index of the first two dimensions, from
    the absolute maximum over the others, divided by 127.5; codes rounded half to even into
    [-128, 127]. A 2-D input (the token-sorted rows an expert receives) has no other dimension, and
    compressed-tensors then takes one scale for the whole tensor."""
    dims = tuple(range(2, x.ndim))
    absmax = x.abs().amax(dims, keepdim=True) if dims else x.abs().amax()
    scale = absmax / 127.5
    return torch.round(x / scale).clamp(-128, 127) * scale


def test_compressed_tensors_moe_w8a8(models, ct_loaded):  # noqa: F811
    """W8A8 (rtn-wa) of LLaDA2 as int-quantized compressed-tensors: the weights are exact, and the
    logits equal (float32) a reference applying compressed-tensors' activation rule to the native
    dequantized weights, the experts included (whose 2-D inputs it quantizes per tensor)."""
    import torch.nn.functional as F

    if "w8a8" not in ct_loaded:
        pytest.skip(f"rtn-wa refuses mixture-of-experts models here ({ct_loaded['w8a8-refused']}); this test runs "
                    "once it accepts them")
    native_dir, out, got = ct_loaded["w8a8"]
    family = "llada2_moe"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    assert got["quantized"] == sorted(_quantized(native_dir))
    model = _load(models[family], family)
    for name, weight in dequantized_weights(native_dir).items():
        linear = model.get_submodule(name)
        linear.weight.data = weight.float()  # exact: an 8-bit code times a float16 scale
        linear.forward = lambda x, lin=linear: F.linear(ct_activation(x), lin.weight, lin.bias)
    with torch.no_grad():
        reference = model(input_ids=TOKENS).logits
    logits = got["logits"].double()
    assert rel(logits, reference) <= 1e-3  # measured 0.0
    assert rel(logits, _native_logits(native_dir, family)) <= 5e-2  # measured 1.0e-2: the activation rules differ


# ---------------------------------------------------------------------------------------------
# quantize --format: converted from memory, equal to convert() of the native checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_quantize_format_equals_convert_of_native(fmt, models, native, tmp_path):  # noqa: F811
    family = "llada2_moe"  # dense first layer, sparse ones, shared experts, router biases
    expected = convert(native(family, "rtn"), tmp_path / "converted", fmt)
    got = quantize(str(models[family]), tmp_path / "direct", _w4("rtn"), calibration=CALIB, trust_remote_code=True,
                   verify=False, device="cpu", output_format=fmt).out
    reference, tensors = load_tensors(expected), load_tensors(got)
    assert sorted(tensors) == sorted(reference)
    for name, tensor in reference.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    assert json.loads((got / "config.json").read_text()) == json.loads((expected / "config.json").read_text())
    assert (got / "qdlm_compat.py").read_text() == (expected / "qdlm_compat.py").read_text()


# ---------------------------------------------------------------------------------------------
# GPTQ and AWQ: exact tensors, and the loaders' selection rules pick exactly the quantized linears
# ---------------------------------------------------------------------------------------------


def _block_linears(model: torch.nn.Module, prefix: str) -> list[str]:
    # optimum's get_layers takes exact nn.Linear instances only (subclasses such as some routers are skipped)
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith(prefix)]


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_moe_unpacks_to_native_weights_and_selects_every_expert(family, models, native, float_models,  # noqa: F811
                                                                     tmp_path):
    src = native(family, "rtn")
    out = convert(src, tmp_path / "gptq", "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["block_name_to_quantize"] == "model.layers"
    tensors = load_tensors(out)
    reference = dequantized_weights(src)
    assert sorted(reference) == sorted(_quantized(src))
    for module, weight in reference.items():
        assert torch.equal(gptq_dequantize(tensors, module, 4), weight), module
    listed = [s for group in qc["modules_in_block_to_quantize"] for s in group]
    linears = _block_linears(float_models[family], qc["block_name_to_quantize"])
    # optimum (transformers' GPTQ path): a block linear is replaced when its name ends with a listed entry
    assert sorted(n for n in linears if any(n.endswith(s) for s in listed)) == sorted(reference)
    # vLLM: an entry occurring in the name
    assert sorted(n for n in linears if any(s in n for s in listed)) == sorted(reference)
    source = load_tensors(models[family])
    for key in (k for k in source if ".mlp.gate." in k):  # the router and its expert_bias, unchanged
        assert torch.equal(tensors[key], source[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_moe_unpacks_to_native_weights_and_skips_the_router(family, native, float_models, tmp_path):
    from transformers.quantizers.quantizers_utils import should_convert_module

    src = native(family, "rtn")
    out = convert(src, tmp_path / "awq", "awq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    skip = qc["modules_to_not_convert"]
    tensors = load_tensors(out)
    reference = dequantized_weights(src)
    for module, weight in reference.items():
        assert torch.equal(awq_dequantize(tensors, module), weight), module
    model = float_models[family]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    # transformers replaces every Linear that should_convert_module lets through; vLLM skips by substring
    assert sorted(n for n in linears if should_convert_module(n, skip)) == sorted(reference)
    assert sorted(n for n in linears if not any(s in n for s in skip)) == sorted(reference)
    assert set(_routers(model, family)) <= set(skip)


def test_gptqmodel_loads_moe_exports(native, float_models, tmp_path):
    """Runs only where gptqmodel is installed (it needs torch >= 2.14.1 and compiles its kernels)."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (needs torch>=2.14.1; not installable here)")
    pytest.importorskip("optimum", reason="transformers loads GPTQ through optimum")
    import transformers

    family = "llada2_moe"
    expected = _native_logits(native(family, "rtn"), family)
    for fmt in ("gptq", "awq"):
        out = convert(native(family, "rtn"), tmp_path / fmt, fmt)
        cls = getattr(transformers, family_by_name(family).auto_class)
        model = cls.from_pretrained(out, dtype=torch.float16, device_map="cpu", trust_remote_code=True)
        with torch.no_grad():
            got = model(input_ids=TOKENS).logits.double()
        assert rel(got, expected) <= 1e-2, fmt  # float16 kernels


# ---------------------------------------------------------------------------------------------
# Refusals where the layout cannot express the checkpoint
# ---------------------------------------------------------------------------------------------


def _inventory(quantized: list[str], kept: list[str], weights: dict) -> ExportInventory:
    scheme = WeightScheme(bits=4, group_size=32, symmetric=True)
    modules = [planned_module(n, 64, 64, scheme, torch.float16) for n in quantized]
    return ExportInventory(qconfig={"weights": weights, "quantized_modules": quantized},
                           modules=modules, passthrough=[(f"{k}.weight", (64, 64)) for k in kept])


def test_gptq_refuses_a_float_linear_that_its_module_list_would_select():
    """Blocks may differ (a dense first layer), but a linear kept in float in one block whose name
    another block's quantized suffix selects would load as an empty GPTQ layer: refused, naming it."""
    weights = {"bits": 4, "group_size": 32, "symmetric": True}
    quantized = ["model.layers.0.mlp.experts.0.up_proj", "model.layers.1.mlp.experts.0.up_proj",
                 "model.layers.1.mlp.experts.1.up_proj"]
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.experts\.1\.up_proj is kept in floating point.*"
                                          r"'mlp\.experts\.1\.up_proj'") as info:
        GPTQ.quantization_config(_inventory(quantized, ["model.layers.0.mlp.experts.1.up_proj"], weights))
    assert "compressed-tensors" in (info.value.hint or "")
    # the same modules with a router kept in float (no suffix selects it) convert
    config = GPTQ.quantization_config(_inventory(quantized, ["model.layers.1.mlp.gate"], weights))
    assert config["modules_in_block_to_quantize"] == [["mlp.experts.0.up_proj", "mlp.experts.1.up_proj"]]


def test_awq_refuses_a_skip_entry_that_vllm_would_apply_to_a_quantized_linear():
    weights = {"bits": 4, "group_size": 32, "symmetric": True}
    inventory = _inventory(["model.layers.0.mlp.gate_proj"], ["model.layers.0.mlp.gate"], weights)
    with pytest.raises(ConfigError, match=r"would also skip quantized modules \['model\.layers\.0\.mlp\.gate_proj'\]"):
        AWQ.quantization_config(inventory)


def test_gptq_refuses_per_module_bit_overrides_naming_the_alternative():
    from qdlm_export.exports.convert import check_convertible

    qconfig = {"weights": {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "float16"},
               "module_overrides": {"model.layers.1.mlp.experts.3.down_proj": {"bits": 8}}}
    with pytest.raises(ConfigError, match=r"experts\.3\.down_proj overrides bits=8 .*Convert to compressed-tensors"):
        check_convertible(qconfig, "gptq")
