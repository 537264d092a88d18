"""Weight-activation checkpoints as written by ``quantize()`` and the CLI: what the format records for
each method (ops, transform tensors, activation scales), that ``from_pretrained`` of the folder
computes exactly what the in-memory quantized model computes, that a loaded linear computes what
docs/FORMAT.md says from the raw tensors, and the CLI's success and failure paths."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from tests.cli_runner import run_cli
from qdlm_export.format.validation import inspect_checkpoint
from qdlm_export.loader.hf_quantizer import QdlmLinear
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.core.transforms import apply_input_transforms
from tests import wa_helpers as H
from tests.reference import dequantized_weights, fake_quant, load_tensors, spec_ops

FAMILIES = ("llada", "dream")
# Tag -> (method, options). Small but complete: every granularity, symmetric and not, clip, qkv_bits.
CONFIGS = {
    "rtn-wa": ("rtn-wa", {"bits": 4, "act_bits": 4}),
    "rtn-wa-static": ("rtn-wa", {"act_granularity": "tensor", "act_symmetric": False, "act_clip_ratio": 0.9,
                                 "qkv_bits": 4}),
    "smoothquant": ("smoothquant", {}),
    "quarot": ("quarot", {}),
    # Static scales of transformed inputs (online Hadamards on attn_out and down); symmetric 4-bit.
    "quarot-static": ("quarot", {"act_granularity": "tensor", "weight_method": "rtn", "w_clip": False}),
    "duquant": ("duquant", {"max_rotation_steps": 8}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``written(family, tag)``: the outlier model quantized by ``quantize()`` into a folder (once)."""
    root = tmp_path_factory.mktemp("wa-checkpoints")

    @functools.lru_cache(maxsize=None)
    def make(family: str, tag: str) -> Path:
        method, options = CONFIGS[tag]
        out = root / f"{family}-{tag}"
        # The calibration in_memory uses (same data, batches of 4, CPU, float32), so both are one
        # quantization. The batching matters: GPTQ's codes follow the Hessian's float summation order.
        quantize(str(H.outlier_model(family)), out, make_config(method, **options), calibration=H.CALIB,
                 trust_remote_code=True, verify=False, device="cpu", batch_size=4)
        return out

    return make


def qconfig(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def local(name: str) -> str:
    """Block-relative name: ``model.layers.1.self_attn.o_proj`` -> ``self_attn.o_proj``."""
    parts = name.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[index + 1 :])


ROLES = {  # role -> the family's block-relative linear names
    "llada": {"qkv": ("q_proj", "k_proj", "v_proj"), "attn_out": ("attn_out",), "gate_up": ("ff_proj", "up_proj"),
              "down": ("ff_out",)},
    "dream": {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_out": ("self_attn.o_proj",),
              "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)},
}


def role_of(family: str, name: str) -> str:
    return next(role for role, names in ROLES[family].items() if local(name) in names)


# ---- serialization: from_pretrained == the in-memory quantized model ---------------------------------------


@pytest.mark.parametrize("tag", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_computes_the_in_memory_quantized_model(written, family, tag):
    method, options = CONFIGS[tag]
    folder = H.outlier_model(family)
    ids = H.tokens(folder, H.EVAL)
    expected = H.logits(H.in_memory(folder, make_config(method, **options)), ids)
    out = written(family, tag)
    loaded = H.load(out)
    listed = set(qconfig(out)["quantized_modules"])
    assert {n for n, m in loaded.named_modules() if isinstance(m, QdlmLinear)} == listed and len(listed) == 14
    got = H.logits(loaded, ids)
    err = H.rel(got, expected)
    assert err <= 1e-5, f"{family} {tag}: loaded vs in-memory relative error {err:.2e}"
    # ...and it is a real quantization, measurably away from the float model.
    assert H.rel(got, H.logits(H.load(folder), ids)) > 1e-3
    inspect_checkpoint(out)  # every promised tensor present with its dtype and shape


# ---- what each method records -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_checkpoint_ops(written, family):
    out = written(family, "smoothquant")
    qc, tensors = qconfig(out), load_tensors(out)
    modules = qc["transforms"]["modules"]
    assert set(modules) == set(qc["quantized_modules"])
    online = []
    for name, ops in modules.items():
        if family == "dream" and role_of(family, name) == "attn_out":  # GQA: smoothing stays online
            assert ops == [{"op": "smooth"}, {"op": "quantize_input"}]
            s = tensors[f"{name}.input_smooth"]
            assert s.dtype == torch.float32 and s.shape == (256,) and bool((s > 0).all())
            online.append(name)
        else:  # folded offline into a norm or the previous linear
            assert ops == [{"op": "quantize_input"}], name
            assert f"{name}.input_smooth" not in tensors
    assert qc["transforms"]["offline"]["kind"] == "smoothquant" and qc["transforms"]["offline"]["alpha"] == 0.5
    assert qc["transforms"]["offline"]["online_smoothing"] == online
    assert qc["activations"] == {"bits": 8, "granularity": "token", "dynamic": True, "symmetric": False,
                                 "clip_ratio": 1.0, "qkv_bits": None}


@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_checkpoint_ops(written, family):
    out = written(family, "quarot")
    qc, tensors = qconfig(out), load_tensors(out)
    for name, ops in qc["transforms"]["modules"].items():
        role = role_of(family, name)
        if role == "attn_out":  # over heads; the per-head H(head_dim) is folded into v and o
            assert ops == [{"op": "hadamard", "size": 4, "stride": 64}, {"op": "quantize_input"}]
        elif role == "down":  # H(768) = H_12 (x) S_64, online (the SiLU gate prevents folding)
            assert ops == [{"op": "hadamard", "size": 768, "stride": 1}, {"op": "quantize_input"}]
        else:
            assert ops == [{"op": "quantize_input"}], name
        # Hadamard matrices are defined by their size: nothing but the weight's own tensors is stored.
        stored = {k.rsplit(".", 1)[1] for k in tensors if k.startswith(name + ".")}
        assert stored <= {"weight_packed", "weight_scale", "weight_shape", "bias"}, stored
    offline = qc["transforms"]["offline"]
    assert offline["kind"] == "quarot" and offline["rotation_seed"] == 0
    norms = [k for k in tensors if k.endswith("norm.weight") or k.endswith("ln_f.weight")]
    assert norms and all(torch.equal(tensors[k], torch.ones_like(tensors[k])) for k in norms)


@pytest.mark.parametrize("family", FAMILIES)
def test_duquant_checkpoint_stores_shared_transforms(written, family):
    out = written(family, "duquant")
    qc, tensors = qconfig(out), load_tensors(out)
    rotation = {"op": "block_rotation", "block_size": 128, "blocks": 1}
    chain = [dict(rotation, tensor="input_rotation_1"), {"op": "permute", "tensor": "input_permutation"},
             dict(rotation, tensor="input_rotation_2"), {"op": "quantize_input"}]
    keys = ("input_rotation_1", "input_permutation", "input_rotation_2")
    for name, ops in qc["transforms"]["modules"].items():
        online_smooth = family == "dream" and role_of(family, name) == "attn_out"
        assert ops == ([{"op": "smooth"}] if online_smooth else []) + chain, name
        for key in keys:
            assert f"{name}.{key}" in tensors
    for block in range(2):
        names = {role: [n for n in qc["quantized_modules"] if f".{block}." in n and role_of(family, n) == role]
                 for role in ROLES[family]}
        for role in ("qkv", "gate_up"):  # k/v carry q's transform, up carries gate's: identical values
            first, *rest = names[role]
            for other in rest:
                for key in keys:
                    assert torch.equal(tensors[f"{other}.{key}"], tensors[f"{first}.{key}"]), (other, key)
        # The search rotated the outlier-carrying inputs (q/k/v and gate/up read the residual stream).
        for first in (names["qkv"][0], names["gate_up"][0]):
            assert not torch.allclose(tensors[f"{first}.input_rotation_1"][0], torch.eye(128), atol=1e-3), first
        assert tensors[f"{names['down'][0]}.input_permutation"].shape == (768,)


# ---- activation quantizers as the methods wire them -------------------------------------------------------


STATIC_SECTIONS = {
    "rtn-wa-static": {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False, "clip_ratio": 0.9,
                      "qkv_bits": 4},
    "quarot-static": {"bits": 4, "granularity": "tensor", "dynamic": False, "symmetric": True, "clip_ratio": 1.0,
                      "qkv_bits": None},
}


@pytest.mark.parametrize("tag", list(STATIC_SECTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_static_per_tensor_scales_are_calibrated_and_stored(written, family, tag):
    """Static activations: each quantized linear stores ``input_scale`` float32 [1] (and, asymmetric,
    ``input_zero_point`` uint8 [1]) computed from the range of its *transformed* input on the
    calibration data, shrunk by clip_ratio. Calibration propagates through the quantized earlier
    layers, which is what the loaded model computes, so the reference range is measured on the loaded
    model: its raw inputs, put through the module's ops as FORMAT.md defines them."""
    out = written(family, tag)
    qc, tensors = qconfig(out), load_tensors(out)
    act = qc["activations"]
    assert act == STATIC_SECTIONS[tag]
    model = H.load(out)
    lo, hi = {}, {}

    def observe(name):
        ops = qc["transforms"]["modules"][name]
        own = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}

        def hook(module, args):
            x = apply_input_transforms(args[0].detach().double(), ops, own)
            lo[name] = torch.minimum(lo.get(name, x.min()), x.min())
            hi[name] = torch.maximum(hi.get(name, x.max()), x.max())
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(observe(n)) for n in qc["quantized_modules"]]
    calib = H.tokens(H.outlier_model(family), H.CALIB)
    with torch.no_grad():
        for start in range(0, calib.shape[0], 4):
            model(input_ids=calib[start : start + 4])
    for h in hooks:
        h.remove()
    clip, bits = act["clip_ratio"], act["bits"]
    for name in qc["quantized_modules"]:
        scale = tensors[f"{name}.input_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (1,)
        x_lo, x_hi = clip * min(lo[name].item(), 0.0), clip * max(hi[name].item(), 0.0)
        if act["symmetric"]:
            assert f"{name}.input_zero_point" not in tensors
            assert scale.item() == pytest.approx(max(-x_lo, x_hi) / (2 ** (bits - 1) - 1), rel=1e-5), name
        else:
            zero = tensors[f"{name}.input_zero_point"]
            assert zero.dtype == torch.uint8 and zero.shape == (1,)
            assert scale.item() == pytest.approx((x_hi - x_lo) / (2**bits - 1), rel=1e-5), name
            assert zero.item() == round(-x_lo / scale.item()), name
    # Dynamic checkpoints store no activation scales at all.
    dynamic = load_tensors(written(family, "rtn-wa"))
    assert not [k for k in dynamic if k.endswith(("input_scale", "input_zero_point"))]


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_bits_quantizes_the_qkv_outputs_only(written, family):
    out = written(family, "rtn-wa-static")
    modules = qconfig(out)["transforms"]["modules"]
    for name, ops in modules.items():
        if role_of(family, name) == "qkv":
            assert ops == [{"op": "quantize_input"}, {"op": "quantize_output"}], name
        else:
            assert ops == [{"op": "quantize_input"}], name
    # Behaviour: each token's q/k/v output (bias included) is on a 4-bit grid, so takes at most 16
    # distinct values over its 256 (or 128) channels; other outputs keep (nearly) all distinct values.
    model = H.load(out)
    outputs = {}
    names = [n for n in modules if ".0." in n]
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, y, n=n: outputs.__setitem__(n, y.detach().double().reshape(-1, y.shape[-1]))) for n in names]
    with torch.no_grad():
        model(input_ids=H.tokens(H.outlier_model(family), H.EVAL)[:2])
    for h in hooks:
        h.remove()
    for name, y in outputs.items():
        distinct = max(len(torch.unique(row)) for row in y)
        if role_of(family, name) == "qkv":
            assert distinct <= 16, (name, distinct)
        else:
            assert distinct > y.shape[-1] // 2, (name, distinct)


@pytest.mark.parametrize(
    "family,tag,module",
    [
        ("llada", "rtn-wa", "ff_out"),  # 4-bit symmetric per token
        ("llada", "rtn-wa", "q_proj"),
        ("llada", "rtn-wa-static", "ff_out"),  # 8-bit asymmetric static, clip 0.9
        ("llada", "rtn-wa-static", "k_proj"),  # ... and 4-bit output quantization
        ("dream", "rtn-wa-static", "self_attn.v_proj"),  # bias before the output quantization
        ("dream", "smoothquant", "self_attn.o_proj"),  # online smooth, 8-bit asymmetric per token
        ("llada", "quarot", "attn_out"),  # Hadamard over heads, 4-bit symmetric
        ("dream", "quarot", "mlp.down_proj"),  # H(768)
        ("llada", "duquant", "up_proj"),  # rotations + permutation, 4-bit asymmetric, clip 0.9
        ("dream", "duquant", "self_attn.o_proj"),  # smooth first
    ],
)
def test_loaded_linear_computes_the_format_from_raw_tensors(written, family, tag, module):
    """A loaded linear's output, against float64 math on the raw checkpoint tensors as docs/FORMAT.md
    defines it: the module's ops, the input quantized as the ``activations`` section says, the
    dequantized weight, the bias, and the output quantization (``qkv_bits``) where listed."""
    out = written(family, tag)
    qc = qconfig(out)
    act = qc["activations"]
    name = f"{H.make_method(H.outlier_model(family), make_config('rtn-wa')).adapter.block_prefix(1)}.{module}"
    ops = qc["transforms"]["modules"][name]
    linear = H.load(out).get_submodule(name)
    weight = dequantized_weights(out)[name]
    own = {k.rsplit(".", 1)[1]: v for k, v in load_tensors(out).items() if k.startswith(name + ".")}
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 17, weight.shape[1], generator=gen)
    x[..., :3] *= 40  # outlier channels
    h = spec_ops(x.double(), ops, own)
    assert ops[-1 if ops[-1]["op"] == "quantize_input" else -2] == {"op": "quantize_input"}
    if act["granularity"] == "tensor":
        hq = fake_quant(h, act["bits"], act["symmetric"], act["clip_ratio"], own["input_scale"],
                        own.get("input_zero_point"))
    else:
        hq = fake_quant(h, act["bits"], act["symmetric"], act["clip_ratio"])
    expected = hq @ weight.T
    if "bias" in own:
        expected = expected + own["bias"].double()
    if {"op": "quantize_output"} in ops:
        expected = fake_quant(expected, act["qkv_bits"], act["symmetric"], act["clip_ratio"])
    with torch.no_grad():
        got = linear(x).double()
    err = H.rel(got, expected)
    assert err <= 1e-4, f"{name}: relative error {err:.2e}"
    # The input quantization matters at these widths: without it the output is measurably different.
    assert H.rel(h @ weight.T + (own["bias"].double() if "bias" in own else 0), expected) > 1e-3


def test_integer_input_without_transforms_quantizes_the_bf16_rows_themselves(written, monkeypatch):
    """A W8A8/W4A4 linear with no online transforms hands its bf16 input to the quantizer as it is (the
    quantizers compute in float32 themselves; on the CPU the native bf16 quantizer takes it): the same
    codes and output, bit for bit, as quantizing a float32 copy, which the linear no longer makes."""
    import qdlm_export.loader.hf_quantizer as hq

    out = written("llada", "rtn-wa")
    name = f"{H.make_method(H.outlier_model('llada'), make_config('rtn-wa')).adapter.block_prefix(1)}.up_proj"
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    linear = model.get_submodule(name)
    assert linear._integer_input and not linear._ops
    seen = []
    real = hq.quantize_per_token

    def spy(h, *args, **kwargs):
        seen.append(h.dtype)
        return real(h, *args, **kwargs)

    monkeypatch.setattr(hq, "quantize_per_token", spy)
    x = (torch.randn(3, 17, linear.in_features, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    with torch.no_grad():
        got = linear(x)
    assert seen == [torch.bfloat16]
    act = linear._act_in
    x_q, x_s = real(x.float(), act.bits, act.clip_ratio)
    expected = hq.packed_int_linear(x_q, x_s, linear.weight_packed, linear.weight_scale,
                                    getattr(linear, "weight_zero_point", None), linear.spec.bits,
                                    linear.spec.group_size, linear.in_features, linear.bias, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


# ---- the CLI ------------------------------------------------------------------------------------------------




FAST_CALIB = ("--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--device", "cpu")


@pytest.mark.parametrize("method,extra", [("smoothquant", ()), ("quarot", ()),
                                          ("duquant", ("-O", "max_rotation_steps=16"))])
def test_cli_quantize_w4a4_then_inspect(monkeypatch, capsys, tmp_path, method, extra):
    model = H.outlier_model("llada")
    out = tmp_path / method
    verify = ("--verify",) if method == "smoothquant" else ("--no-verify",)  # reloading is tested above
    code, stdout, err = run_cli(monkeypatch, capsys, "quantize", str(model), "--trust-remote-code", "--method", method,
                                "--bits", "4", "--act-bits", "4", *FAST_CALIB, *extra, *verify, "--out", str(out),
                                "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["method"] == method and summary["bits"] == 4 and summary["act_bits"] == 4
    assert summary["quantized_modules"] == 14
    if method == "smoothquant":
        assert 0 < summary["relative_output_error"] < 1

    code, stdout, err = run_cli(monkeypatch, capsys, "inspect", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["valid"] and info["method"] == method and info["bits"] == 4
    assert info["activations"]["bits"] == 4 and info["activations"]["granularity"] == "token"
    assert set(info["transforms"]["modules"]) == set(info["quantized_modules"])
    assert all(ops[-1] == {"op": "quantize_input"} for ops in info["transforms"]["modules"].values())

    if method == "duquant":  # inspect really checks the transform tensors
        weights = load_file(out / "model.safetensors")
        del weights["model.transformer.blocks.1.k_proj.input_permutation"]
        save_file(weights, out / "model.safetensors")
        code, _, err = run_cli(monkeypatch, capsys, "inspect", str(out), "--json")
        assert code != 0 and "Traceback" not in err
        assert "model.transformer.blocks.1.k_proj.input_permutation" in err and "missing" in err


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """Tiny LLaDA models QuaRot has no Hadamard matrix for (188 = 4 * 47: no Paley construction, not in
    the Williamson table)."""
    from qdlm_export.fixtures import build_tiny_model

    root = tmp_path_factory.mktemp("odd-models")

    @functools.lru_cache(maxsize=None)
    def make(kind: str) -> Path:
        sizes = {"hidden-376": dict(hidden_size=376), "mlp-752": dict(intermediate_size=752)}[kind]
        return build_tiny_model("llada", root / kind, seed=0, **sizes)

    return make


@pytest.mark.parametrize(
    "model,args,needles",
    [
        (None, ["--method", "quarot", "--act-bits", "3"], ["--act-bits 3", "4 or 8"]),
        (None, ["--method", "duquant", "--qkv-bits", "5"], ["--qkv-bits 5"]),
        (None, ["--method", "smoothquant", "--alpha", "1.5"], ["--alpha 1.5", "[0, 1]"]),
        (None, ["--method", "quarot", "--alpha", "0.5"], ["alpha", "'quarot'"]),
        (None, ["--method", "rtn", "--act-bits", "4"], ["act_bits", "'rtn'"]),
        (None, ["--method", "rtn-wa", "--act-granularity", "channel"], ["'channel'", "token"]),
        (None, ["--method", "duquant", "-O", "block_size=96"], ["block size 96", "hidden size 256", "block_size="]),
        (None, ["--method", "duquant", "-O", "block_size=7"], ["block size 7", "block_size="]),
        (None, ["--method", "quarot", "-O", "weight_method=awq"], ["weight_method=awq", "gptq"]),
        ("hidden-376", ["--method", "quarot"], ["Hadamard", "hidden size 376", "188", "smoothquant or duquant"]),
        ("mlp-752", ["--method", "quarot"], ["Hadamard", "752", "nearest sizes with one are 740, 748, 760, 768"]),
    ],
)
def test_cli_bad_weight_activation_options(monkeypatch, capsys, tmp_path, odd_model, model, args, needles):
    source = odd_model(model) if model else H.outlier_model("llada")
    out = tmp_path / "o"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(source), "--trust-remote-code", *args, *FAST_CALIB,
                           "--out", str(out))
    assert code != 0 and "Traceback" not in err and "internal error" not in err
    flat = " ".join(err.split())  # rich wraps long lines
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {flat}"
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left
