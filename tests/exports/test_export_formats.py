"""Exports to GPTQ, AWQ and compressed-tensors, checked by loaders that are not the exporter.

* compressed-tensors: the converted folder is loaded by stock transformers (+ compressed-tensors)
  in a subprocess where ``import qdlm_export`` fails, and its logits are compared with the native
  loader's.
* GPTQ / AWQ: no loader runs on this CPU-only torch (transformers needs gptqmodel, which needs a newer
  torch), so the tensors are unpacked below from the formats' own rules (GPTQModel's v1 layout and
  3-bit packer, AutoAWQ's GEMM interleave; docs/EXPORTS.md) -- no qdlm_export code -- and the
  dequantized weights must equal the native ones exactly. With gptqmodel installed, transformers
  loads both and the logits are compared too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qdlm_export  # noqa: F401  (registers the native loader in this process)
from qdlm_export.exports.convert import check_convertible, convert
from qdlm_export.errors import ConfigError
from qdlm_export.quantize.api import make_config, quantize
from tests.isolation import BLOCKER, TOKENS, rel, run_isolated
from tests.reference import dequantized_weights, load_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a second thread only adds overhead

# name -> (method, options); every weight-only scheme uses float16 scales (what GPTQ/AWQ store)
SCHEMES = {
    "w4": ("rtn", dict(bits=4, group_size=128, symmetric=True)),
    "w8": ("rtn", dict(bits=8, group_size=-1, symmetric=True)),
    "w8a8": ("rtn-wa", dict(bits=8, group_size=-1)),
    "w4asym": ("rtn", dict(bits=4, group_size=64, symmetric=False)),
    "w3asym": ("rtn", dict(bits=3, group_size=128, symmetric=False)),
    "w2": ("rtn", dict(bits=2, group_size=32, symmetric=True)),
    # group 96 does not divide 256: those linears fall back to per-channel (module_overrides)
    "mixed": ("rtn", dict(bits=4, group_size=96, symmetric=True, group_fallback="per-channel")),
}


@pytest.fixture(scope="module")
def native(qwen, tmp_path_factory):
    """name -> native checkpoint of the tiny Qwen2, quantized on first use."""
    root = tmp_path_factory.mktemp("native")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            method, options = SCHEMES[name]
            config = make_config(method, scale_dtype="float16", **options)
            quantize(str(qwen), root / name, config, verify=False)
            made[name] = root / name
        return made[name]

    return get


def native_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.double()


# ---------------------------------------------------------------------------------------------
# compressed-tensors: stock transformers, qdlm_export not importable
# ---------------------------------------------------------------------------------------------

CT_LOADER = BLOCKER + """
import json, sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

jobs = json.loads(sys.argv[1])
tokens = torch.load(sys.argv[2])
for job in jobs:
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if job["dequantize"] else {}
    model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32, trust_remote_code=job["remote"],
                                                 **kwargs)
    with torch.no_grad():
        torch.save(model(input_ids=tokens).logits, job["out"])
leaked = sorted(k for k in sys.modules if k.startswith("qdlm_export"))
assert not leaked, leaked
print("isolated-ok")
"""


@pytest.fixture(scope="module")
def llada_native(tiny_llada, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llada") / "llada-w4"
    config = make_config("rtn", bits=4, group_size=128, scale_dtype="float16")
    quantize(str(tiny_llada), out, config, trust_remote_code=True, verify=False)
    return out


@pytest.fixture(scope="module")
def ct_logits(native, llada_native, tmp_path_factory):
    """Convert the schemes to compressed-tensors and load them all in one isolated process."""
    work = tmp_path_factory.mktemp("ct")
    cases = {"w4": False, "w8": False, "w8a8": False, "w4asym": True, "mixed": False, "llada": False}  # -> dequantize
    jobs = []
    for name, dequant in cases.items():
        src = llada_native if name == "llada" else native(name)
        folder = convert(src, work / f"{name}-ct", "compressed-tensors")
        jobs.append({"folder": str(folder), "out": str(work / f"{name}.pt"), "dequantize": dequant,
                     "remote": name == "llada"})
    torch.save(TOKENS, work / "tokens.pt")
    run_isolated(CT_LOADER, [json.dumps(jobs), str(work / "tokens.pt")], work)
    return {name: torch.load(work / f"{name}.pt").double() for name in cases}


@pytest.mark.parametrize("name", ["w4", "w8", "mixed"])
def test_compressed_tensors_weight_only_matches_native(name, native, ct_logits):
    assert rel(ct_logits[name], native_logits(native(name))) <= 1e-3


def test_compressed_tensors_remote_code_dllm(llada_native, ct_logits):
    """A LLaDA export: the model's own remote code, compressed-tensors' quantizer, no qdlm_export."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(llada_native, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits.double()
    assert rel(ct_logits["llada"], expected) <= 1e-3


def test_compressed_tensors_mixed_schemes_use_explicit_targets(native, tmp_path):
    out = convert(native("mixed"), tmp_path / "ct", "compressed-tensors")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    strategies = sorted((g["weights"]["strategy"], len(g["targets"])) for g in groups.values())
    assert strategies == [("channel", 12), ("group", 2)]  # the two down_proj (in 768) keep group 96


def test_compressed_tensors_asymmetric_loads_dequantized(native, ct_logits):
    # transformers' default (compressed) path rejects packed asymmetric zero points (upstream issue);
    # CompressedTensorsConfig(dequantize=True) loads them (weights rebuilt in the scale dtype).
    assert rel(ct_logits["w4asym"], native_logits(native("w4asym"))) <= 1e-3


def test_compressed_tensors_w8a8(native, qwen, ct_logits):
    """Weights are exact; CT's per-token activation quantizer (absmax/127.5, [-128, 127], round half
    to even) is not the native one (absmax/127, [-127, 127], round half away), so the logits are
    compared with a reference built on CT's rule (in float32, as the loader computes: a float64
    reference flips near-tie activation codes), and with the native loader loosely."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    def ct_activation(x):
        scale = x.abs().amax(-1, keepdim=True) / 127.5
        return torch.round(x / scale).clamp(-128, 127) * scale

    model = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    for name, weight in dequantized_weights(native("w8a8")).items():
        linear = model.get_submodule(name)
        linear.weight.data = weight.float()  # exact: 8-bit code times a float16 scale
        linear.forward = lambda x, lin=linear: F.linear(ct_activation(x), lin.weight, lin.bias)
    with torch.no_grad():
        reference = model(input_ids=TOKENS).logits
    assert rel(ct_logits["w8a8"], reference) <= 1e-3
    assert rel(ct_logits["w8a8"], native_logits(native("w8a8"))) <= 5e-2  # measured 1.9e-2


def test_compressed_tensors_config_and_tensors(native, tmp_path):
    out = convert(native("w4asym"), tmp_path / "ct", "compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "group_size": 64,
                                "strategy": "group", "dynamic": False}
    assert "lm_head" in qc["ignore"]
    src, dst = load_tensors(native("w4asym")), load_tensors(out)
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(src[f"{name}.weight_packed"], dst[f"{name}.weight_packed"])  # same stream, same bytes
    zp = dst[f"{name}.weight_zero_point"]  # packed along dim 0: [out * 4 / 32, groups]
    assert zp.dtype == torch.int32 and tuple(zp.shape) == (256 // 8, 256 // 64)
    nibbles = torch.stack([(zp.t().to(torch.int64) >> (4 * k)) & 15 for k in range(8)], -1).reshape(4, 256).t()
    assert torch.equal(nibbles, src[f"{name}.weight_zero_point"].to(torch.int64))
    # the README says how to load this format, and the report keeps the native config
    assert "compressed-tensors" in (out / "README.md").read_text()
    report = json.loads((out / "qdlm_report.json").read_text())
    assert report["export"]["native_quantization_config"]["quant_method"] == "qdlm"
    assert (out / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------
# GPTQ and AWQ: independent unpackers
# ---------------------------------------------------------------------------------------------


def gptq3_layout() -> list[list[tuple[int, int, int, int]]]:
    """For each of the 32 codes of a GPTQ 3-bit block (3 int32 words), its pieces as
    ``(word, shift_in_word, nbits, shift_in_code)``, transcribed from GPTQ's packer: codes 0-9 at
    bits 0..29 of word 0, code 10 split (2 low bits at 30, its bit 2 at bit 0 of word 1), codes 11-20
    at bits 1..30 of word 1, code 21 split (bit 0 at bit 31, bits 1-2 at bits 0-1 of word 2),
    codes 22-31 at bits 2..31 of word 2."""
    layout = [[(0, 3 * j, 3, 0)] for j in range(10)]
    layout.append([(0, 30, 2, 0), (1, 0, 1, 2)])
    layout += [[(1, 3 * j + 1, 3, 0)] for j in range(10)]
    layout.append([(1, 31, 1, 0), (2, 0, 2, 1)])
    layout += [[(2, 3 * j + 2, 3, 0)] for j in range(10)]
    return layout


def gptq_unpack(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Unpack GPTQ int32 words along ``dim`` (0: qweight's input dim, 1: qzeros' output dim)."""
    words = (packed.to(torch.int64) & 0xFFFFFFFF)
    if dim == 1:
        words = words.t()
    if bits == 3:
        blocks = words.reshape(-1, 3, words.shape[-1])
        codes = []
        for pieces in gptq3_layout():
            value = 0
            for word, shift, nbits, at in pieces:
                value = value | (((blocks[:, word] >> shift) & ((1 << nbits) - 1)) << at)
            codes.append(value)
        out = torch.stack(codes, 1).reshape(-1, words.shape[-1])
    else:
        per = 32 // bits
        out = torch.stack([(words >> (bits * k)) & ((1 << bits) - 1) for k in range(per)], 1).reshape(-1, words.shape[-1])
    out = out[:n]
    return out if dim == 0 else out.t()


def gptq_dequantize(t: dict[str, torch.Tensor], name: str, bits: int) -> torch.Tensor:
    """W [out, in] from GPTQ v1 tensors: W^T[i, o] = scales[g_idx[i], o] * (q[i, o] - (qzeros + 1))."""
    scales = t[f"{name}.scales"].double()
    g_idx = t[f"{name}.g_idx"].long()
    n_in, n_out = g_idx.numel(), scales.shape[1]
    q = gptq_unpack(t[f"{name}.qweight"], bits, n_in, 0).double()
    z = gptq_unpack(t[f"{name}.qzeros"], bits, n_out, 1).double() + 1
    return (scales[g_idx] * (q - z[g_idx])).t()


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of a word holds output column 8j + AWQ_ORDER[k]


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows, cols = words.shape
    out = torch.zeros(rows, cols * 8, dtype=torch.int64)
    for k, column in enumerate(AWQ_ORDER):
        out[:, column::8] = (words >> (4 * k)) & 15
    return out


def awq_dequantize(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    scales = t[f"{name}.scales"].double()
    q = awq_unpack(t[f"{name}.qweight"]).double()  # [in, out]
    z = awq_unpack(t[f"{name}.qzeros"]).double()  # [groups, out]
    group = q.shape[0] // scales.shape[0]
    g = torch.arange(q.shape[0]) // group
    return ((q - z[g]) * scales[g]).t()


@pytest.mark.parametrize("name,bits", [("w4", 4), ("w3asym", 3), ("w2", 2), ("w8", 8), ("w4asym", 4)])
def test_gptq_unpacks_to_native_weights(native, tmp_path, name, bits):
    out = convert(native(name), tmp_path / "gptq", "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["bits"] == bits
    assert qc["sym"] == SCHEMES[name][1]["symmetric"] and qc["desc_act"] is False
    assert qc["block_name_to_quantize"] == "model.layers"
    tensors, native_tensors = load_tensors(out), load_tensors(native(name))
    reference = dequantized_weights(native(name))
    assert len(reference) == 14
    for module, weight in reference.items():
        assert tensors[f"{module}.qweight"].dtype == torch.int32
        assert tensors[f"{module}.scales"].dtype == torch.float16
        assert torch.equal(gptq_dequantize(tensors, module, bits), weight), module
        if f"{module}.bias" in native_tensors:
            assert torch.equal(tensors[f"{module}.bias"], native_tensors[f"{module}.bias"].half())
    assert torch.equal(tensors["lm_head.weight"], native_tensors["lm_head.weight"])


@pytest.mark.parametrize("name", ["w4", "w4asym"])
def test_awq_unpacks_to_native_weights(native, tmp_path, name):
    out = convert(native(name), tmp_path / "awq", "awq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["zero_point"] is True
    assert "lm_head" in qc["modules_to_not_convert"]
    tensors = load_tensors(out)
    for module, weight in dequantized_weights(native(name)).items():
        assert tuple(tensors[f"{module}.qweight"].shape) == (weight.shape[1], weight.shape[0] // 8)
        assert torch.equal(awq_dequantize(tensors, module), weight), module


def test_gptqmodel_loads_exports(native, tmp_path):
    """Runs only where gptqmodel is installed (it needs torch >= 2.14.1 and compiles its kernels)."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (needs torch>=2.14.1; not installable here)")
    pytest.importorskip("optimum", reason="transformers loads GPTQ through optimum")
    from transformers import AutoModelForCausalLM

    expected = native_logits(native("w4"))
    for fmt in ("gptq", "awq"):
        out = convert(native("w4"), tmp_path / fmt, fmt)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
        with torch.no_grad():
            got = model(input_ids=TOKENS).logits.double()
        assert rel(got, expected) <= 1e-2, fmt  # float16 kernels


# ---------------------------------------------------------------------------------------------
# Refusals: each names what cannot be expressed
# ---------------------------------------------------------------------------------------------


def _with_online_rotation(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    qc["transforms"] = {"modules": {m: [{"op": "hadamard", "size": 256, "stride": 1}] for m in qc["quantized_modules"]
                                    if m.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"))}}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_online_transforms_are_refused(native, tmp_path, fmt):
    rotated = _with_online_rotation(native("w4"), tmp_path / "rotated")
    with pytest.raises(ConfigError, match="online input transforms.*hadamard"):
        convert(rotated, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_scheme_refusals_name_the_reason():
    w = {"bits": 4, "group_size": 128, "symmetric": True, "scale_dtype": "float16"}
    with pytest.raises(ConfigError, match="4-bit only"):
        check_convertible({"weights": dict(w, bits=3)}, "awq")
    with pytest.raises(ConfigError, match="float32 scales"):
        check_convertible({"weights": dict(w, scale_dtype="float32")}, "gptq")
    acts = {"bits": 8, "granularity": "token", "symmetric": True, "clip_ratio": 1.0}
    with pytest.raises(ConfigError, match="weight-only format"):
        check_convertible({"weights": dict(w, bits=8, group_size=-1), "activations": acts}, "gptq")
    with pytest.raises(ConfigError, match="4-bit activations"):
        check_convertible({"weights": w, "activations": dict(acts, bits=4)}, "compressed-tensors")
    with pytest.raises(ConfigError, match="needs 8-bit symmetric per-channel weights"):
        check_convertible({"weights": w, "activations": acts}, "compressed-tensors")
    with pytest.raises(ConfigError, match="clip_ratio"):
        check_convertible({"weights": dict(w, bits=8, group_size=-1), "activations": dict(acts, clip_ratio=0.9)},
                          "compressed-tensors")
    with pytest.raises(ConfigError, match="output head"):
        check_convertible({"weights": w, "quantized_modules": ["model.layers.0.q_proj", "lm_head"]}, "gptq")
    with pytest.raises(ConfigError, match="unknown export format"):
        check_convertible({"weights": w}, "gguf")
    check_convertible({"weights": dict(w, bits=8, group_size=-1), "activations": acts}, "compressed-tensors")
    check_convertible({"weights": w}, "awq")


def test_gptq_refuses_zero_point_zero_and_inexact_scales(native, tmp_path):
    src = tmp_path / "edited"
    shutil.copytree(native("w4asym"), src)
    tensors = load_tensors(src)
    key = "model.layers.0.mlp.up_proj.weight_zero_point"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 0
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="zero point 0"):
        convert(src, tmp_path / "gptq", "gptq")
    convert(src, tmp_path / "awq", "awq")  # AWQ stores zero points as they are

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weights"]["scale_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(config))
    key = "model.layers.0.mlp.up_proj.weight_scale"
    tensors = load_tensors(src)
    tensors = {k: (v.to(torch.bfloat16) if k.endswith("weight_scale") else v) for k, v in tensors.items()}
    tensors[key][0, 0] = 1e-7  # a bfloat16 value float16 can only approximate (subnormal range)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="not exactly representable in float16"):
        convert(src, tmp_path / "awq2", "awq")


def test_convert_is_atomic_and_refuses_existing_output(native, tmp_path):
    out = tmp_path / "gptq"
    convert(native("w4"), out, "gptq")
    with pytest.raises(Exception, match="already exists"):
        convert(native("w4"), out, "gptq")
    convert(native("w4"), out, "gptq", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with safe_open(out / "model.safetensors", "pt") as h:
        assert "model.layers.0.self_attn.q_proj.qweight" in h.keys()  # noqa: SIM118
