"""DiffusionGemma in the native format, loaded with ``from_pretrained``: the decoder's linears become
``QdlmLinear``s and its fused experts ``QdlmFusedExperts`` over stacked packed tensors (grouped expert
GEMM), the causal encoder computes with the very same modules (the checkpoint stores them once), and
everything else loads as stored.

No pipeline: :func:`write_rtn_checkpoint` RTN-quantizes the tiny fixture's weights in memory (the
experts expert by expert, from the 3-D tensors, under the unfused view's names the pipeline reports)
and writes them through the stacking sink and the config builder as ``quantize/api.py`` does. The
reference is transformers' own model in float64 holding the checkpoint's codes dequantized straight
from docs/FORMAT.md (no qdlm_export code), its experts on transformers' eager loop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qdlm_export  # noqa: F401  (registers the quantizer and the qdlm_diffusion_gemma model type)
from qdlm_export.core.schemes import WeightScheme, quantize_rtn
from qdlm_export.families import family_by_name
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.format.config_schema import build_quantization_config
from qdlm_export.format.report import build_report, write_report
from qdlm_export.format.spec import dtype_name
from qdlm_export.format.stacked_experts import StackingSink, shared_stack_section
from qdlm_export.format.writer import ShardedWriter
from qdlm_export.loader.fused_experts import QdlmFusedExperts, QdlmStackedLinear
from qdlm_export.loader.hf_quantizer import QdlmLinear
from qdlm_export.loader.native_wrappers import wrap_native
from tests.isolation import BLOCKER, rel, run_isolated
from tests.reference import load_tensors, unpack_bits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ADAPTER = family_by_name("diffusion_gemma")
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# ---- the checkpoint, written as quantize/api.py writes it ---------------------------------------

def _scheme(base: WeightScheme, in_features: int) -> WeightScheme:
    """The per-channel fallback of methods/base.py where the group size does not divide the input."""
    if base.group_size == -1 or in_features % base.group_size == 0:
        return base
    return WeightScheme(base.bits, -1, base.symmetric)


def unfused_linears(source: Path) -> dict[str, torch.Tensor]:
    """Every linear the pipeline quantizes, by the name it reports, in block order: the adapter's dense
    linears and, per expert, ``experts.E.{gate,up,down}_proj`` cut from the fused 3-D tensors."""
    tensors = load_tensors(source)
    config = json.loads((source / "config.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for block in range(ADAPTER.num_layers(config)):
        for name in ADAPTER.stored_linears(block, tensors):
            out[name] = tensors[f"{name}.weight"]
        experts = f"{ADAPTER.block_prefix(block)}.experts"
        gate_up, down = tensors[f"{experts}.gate_up_proj"], tensors[f"{experts}.down_proj"]
        rows = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[f"{experts}.{e}.gate_proj"] = gate_up[e, :rows]
            out[f"{experts}.{e}.up_proj"] = gate_up[e, rows:]
        for e in range(down.shape[0]):
            out[f"{experts}.{e}.down_proj"] = down[e]
    return out


def write_rtn_checkpoint(source: Path, out: Path, *, bits: int = 4, group_size: int = 64, symmetric: bool = True,
                         scale_dtype: torch.dtype = torch.float16, scheme_of=None) -> Path:
    """An RTN checkpoint of ``source`` written through ``StackingSink`` + ``build_quantization_config``
    (``scheme_of(name, default)``: another scheme for some linears)."""
    out.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    linears = unfused_linears(source)
    writer = ShardedWriter(out)
    sink = StackingSink.for_model(writer, ADAPTER, config)
    base = WeightScheme(bits, group_size, symmetric)
    overrides: dict[str, dict] = {}
    for name, weight in linears.items():
        scheme = _scheme(base, weight.shape[1])
        if scheme_of is not None:
            scheme = scheme_of(name, scheme)
        if scheme != base:
            overrides[name] = {k: getattr(scheme, k) for k in ("bits", "group_size", "symmetric")
                               if getattr(scheme, k) != getattr(base, k)}
        sink.add_linear(name, quantize_rtn(weight.float(), scheme, scale_dtype))
    quantized_stored = {n for n in load_tensors(source) if n.removesuffix(".weight") in linears}
    fused = {f"{ADAPTER.block_prefix(b)}.experts.{p}" for b in range(ADAPTER.num_layers(config))
             for p in ("gate_up_proj", "down_proj")}
    for name, tensor in load_tensors(source).items():
        if name not in quantized_stored and name not in fused:
            sink.add_tensor(name, tensor)
    section = sink.finish()
    writer.close()
    config["quantization_config"] = build_quantization_config(
        method="rtn", method_options={}, weights={"bits": bits, "group_size": group_size, "symmetric": symmetric,
                                                  "scale_dtype": dtype_name(scale_dtype)},
        activations=None, family=ADAPTER.name, mask_token_id=ADAPTER.mask_token_id(config),
        logits_shift=ADAPTER.logits_shift, quantized_modules=list(linears), module_overrides=overrides,
        modules_not_converted=["lm_head"], transforms={}, calibration=None,
        provenance={"source": "tiny-diffusion-gemma", "tool": "qdlm-export"},
        fused_experts=section, shared_stack=shared_stack_section(ADAPTER),
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in MODEL_FILES:
        shutil.copy2(source / name, out / name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    write_report(out, build_report(
        source="tiny-diffusion-gemma", linear_params=0, linear_bytes_original=0, linear_bytes_quantized=0,
        checkpoint_bytes=size, source_checkpoint_bytes=size, relative_output_error=None, calibration=None,
        seconds_per_block=[], elapsed_s=0.0, compat_repairs=[], manifest=writer.manifest()))
    wrap_native(out)  # as quantize does: its own model type, never random weights without the tool
    return out


# ---- the float64 reference ------------------------------------------------------------------------

def dequantized_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Stored tensor name -> float64 dense weight, from docs/FORMAT.md alone: quantized linears as
    ``NAME.weight``, stacked experts as ``MODULE.gate_up_proj`` [E, 2I, H] / ``MODULE.down_proj`` [E, H, I]."""
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_tensors(folder)
    out = {}
    for name in qconfig["quantized_modules"]:
        w = dict(qconfig["weights"], **qconfig["module_overrides"].get(name, {}))
        shapes = tensors[f"{name}.weight_shape"]
        stacked = shapes.dim() == 2
        experts = []
        for e in range(shapes.shape[0] if stacked else 1):
            part = {s: (t[e] if stacked else t) for s in ("weight_shape", "weight_packed", "weight_scale",
                                                          "weight_zero_point")
                    if (t := tensors.get(f"{name}.{s}")) is not None}
            cols = int(part["weight_shape"][1])
            codes = unpack_bits(part["weight_packed"], w["bits"], cols).double()
            group = cols if w["group_size"] == -1 else w["group_size"]
            scale = part["weight_scale"].double().repeat_interleave(group, dim=1)
            zero = 2 ** (w["bits"] - 1) if w["symmetric"] else part[
                "weight_zero_point"].double().repeat_interleave(group, dim=1)
            experts.append((codes - zero) * scale)
        out[name if stacked else f"{name}.weight"] = torch.stack(experts) if stacked else experts[0]
    return out


def float64_model(source: Path):
    """The source model in float64 on transformers' eager expert loop (its grouped_mm takes no float64)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float64).eval()
    model.set_experts_implementation("eager")
    return model


def reference_model(source: Path, folder: Path):
    """transformers' DiffusionGemma in float64 with the checkpoint's dequantized weights (the encoder's
    are the decoder's by transformers' own tying) and its eager per-expert loop."""
    model = float64_model(source)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, weight in dequantized_checkpoint(folder).items():
            params[name].copy_(weight)
    return model


# ---- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "src", seed=3)


@pytest.fixture(scope="module")
def checkpoints(source, tmp_path_factory) -> dict[str, Path]:
    """W4 g64 symmetric (fp16 scales); W3 g128 asymmetric (bf16 scales), whose 192- and 64-wide inputs
    (mlp.down_proj, experts' down) fall back to per-channel scales, stacked experts included."""
    root = tmp_path_factory.mktemp("dg-q")
    return {
        "w4": write_rtn_checkpoint(source, root / "w4"),
        "w3": write_rtn_checkpoint(source, root / "w3", bits=3, group_size=128, symmetric=False,
                                   scale_dtype=torch.bfloat16),
    }


def load(folder: Path, **kwargs):
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def inputs(seed: int, batch: int = 2, context: int = 11, canvas: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (batch, context), generator=gen), torch.randint(0, 2112, (batch, canvas), generator=gen)


def logits(model, ctx, canvas) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ctx, decoder_input_ids=canvas).logits


# ---- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["w4", "w3"])
def test_logits_match_the_float64_dequantized_reference(source, checkpoints, key):
    folder = checkpoints[key]
    model, reference = load(folder), reference_model(source, folder)
    for seed in (11, 12):
        ctx, canvas = inputs(seed)
        err = rel(logits(model, ctx, canvas), logits(reference, ctx, canvas))
        assert err <= 1e-4, f"{key}: quantized model vs float64 reference {err:.2e}"
    # the reference really differs from the source model: the check above is about the codes
    assert rel(logits(float64_model(source), ctx, canvas), logits(reference, ctx, canvas)) > 1e-2


def test_both_stacks_are_the_same_quantized_modules(checkpoints, tmp_path):
    """Every quantized module of an encoder layer is its decoder layer's; every full-precision tensor
    (norms, routers, embeddings, the self-conditioning MLP, the vision tower, each stack's own
    layer_scalar) holds the stored value, the encoder's layer_scalar its own even where it differs."""
    folder = tmp_path / "scalars"
    shutil.copytree(checkpoints["w4"], folder)
    file = folder / "model.safetensors"
    stored = load_file(file)
    stored["model.encoder.language_model.layers.1.layer_scalar"] = stored[
        "model.decoder.layers.1.layer_scalar"] * 1.25  # so that "its own" is visible
    save_file(stored, file, metadata={"format": "pt"})
    model = load(folder)
    state = model.state_dict()
    quantized = json.loads((folder / "config.json").read_text())["quantization_config"]["quantized_modules"]
    plain = {k: v for k, v in stored.items() if not any(k.startswith(q + ".") for q in quantized)}
    assert plain and all(torch.equal(state[k], v) for k, v in plain.items())
    decoder, encoder = model.model.decoder.layers, model.model.encoder.language_model.layers
    for i, (dec, enc) in enumerate(zip(decoder, encoder, strict=True)):
        assert isinstance(dec.experts, QdlmFusedExperts) and enc.experts is dec.experts
        assert isinstance(dec.experts.gate_up_proj, QdlmStackedLinear) and dec.experts.num_experts == 8
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj"):
            assert isinstance(dec.get_submodule(path), QdlmLinear), (i, path)
            assert enc.get_submodule(path) is dec.get_submodule(path), (i, path)
        has_v = ADAPTER.layer_type({"text_config": model.config.text_config.to_dict()}, i) != "full_attention"
        assert (getattr(dec.self_attn, "v_proj", None) is not None) == has_v
        if has_v:
            assert enc.self_attn.v_proj is dec.self_attn.v_proj
        # full precision, as stored: the router and norms tied, each stack's layer_scalar its own
        assert enc.router.proj.weight is dec.router.proj.weight and enc.input_layernorm.weight is dec.input_layernorm.weight
        assert enc.layer_scalar is not dec.layer_scalar
    # the only full-precision linears left in the layers are the routers
    dense = {n.split(".", 1)[1] for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert dense == {"router.proj"}
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


def test_perturbing_one_code_changes_both_stacks(checkpoints, tmp_path):
    """One packed word of layer 0's stacked gate_up changed in the file: the encoder's output (the
    context's last hidden state) and the decoder's logits both move; the other expert's word is inert
    where no token reaches that expert."""
    folder = tmp_path / "perturbed"
    shutil.copytree(checkpoints["w4"], folder)
    ctx, canvas = inputs(21)
    model = load(folder)
    with torch.no_grad():
        before = model(input_ids=ctx, decoder_input_ids=canvas)
    routed = _experts_of_layer0(model, ctx, canvas)
    expert = max(routed, key=routed.get)  # the most used expert of layer 0, in both stacks
    file = folder / "model.safetensors"
    tensors = load_file(file)
    key = "model.decoder.layers.0.experts.gate_up_proj.weight_packed"
    tensors[key] = tensors[key].clone()
    tensors[key][expert] ^= 0x7777_7777  # every code of that expert's gate and up rows changes
    save_file(tensors, file, metadata={"format": "pt"})
    with torch.no_grad():
        after = load(folder)(input_ids=ctx, decoder_input_ids=canvas)
    assert rel(after.encoder_last_hidden_state, before.encoder_last_hidden_state) > 1e-3
    assert rel(after.logits, before.logits) > 1e-3


def _experts_of_layer0(model, ctx, canvas) -> dict[int, int]:
    """How many (token, slot) pairs each expert of layer 0 received, over both stacks' passes."""
    seen: dict[int, int] = {}
    module = model.model.decoder.layers[0].experts

    def count(_module, args):
        for e in args[1].reshape(-1).tolist():
            seen[e] = seen.get(e, 0) + 1

    handle = module.register_forward_pre_hook(count)
    try:
        logits(model, ctx, canvas)
    finally:
        handle.remove()
    return seen


STOCK = BLOCKER + """
import json, sys, torch
import transformers

jobs, ctx, canvas = json.loads(sys.argv[1]), torch.load(sys.argv[2]), torch.load(sys.argv[3])
results = {}
for job in jobs:
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            job["folder"], trust_remote_code=job["trust"], dtype=torch.float32)
    except Exception as exc:
        results[job["name"]] = {"refused": type(exc).__name__, "message": str(exc)}
        continue
    layers = model.model.decoder.layers, model.model.encoder.language_model.layers
    with torch.no_grad():
        out = model(input_ids=ctx, decoder_input_ids=canvas).logits
    torch.save(out, job["out"])
    results[job["name"]] = {"experts": type(layers[0][0].experts).__name__,
                            "shared": all(e.experts is d.experts and e.self_attn.q_proj is d.self_attn.q_proj
                                          for d, e in zip(*layers)),
                            "calls": [d.experts.calls for d in layers[0]]}
json.dump(results, open(sys.argv[4], "w"))
assert not [k for k in sys.modules if k.startswith("qdlm_export")]
print("isolated-ok")
"""


def test_loads_in_stock_transformers_without_qdlm_export(checkpoints, tmp_path):
    """qdlm_export unimportable: the self-contained folder loads through its own loader copy (fused
    experts, shared stacks, the grouped GEMM's torch reference) with the in-package logits; without
    trust_remote_code it is refused, and a --no-self-contained folder asks for qdlm-export. Never
    the dense model with random weights."""
    from qdlm_export.loader.native_wrappers import add_guard
    from qdlm_export.loader.selfcontained import make_self_contained

    sc, guarded = tmp_path / "sc", tmp_path / "guarded"
    shutil.copytree(checkpoints["w3"], sc)
    shutil.copytree(checkpoints["w3"], guarded)
    make_self_contained(sc)
    add_guard(guarded)
    ctx, canvas = inputs(31)
    torch.save(ctx, tmp_path / "ctx.pt")
    torch.save(canvas, tmp_path / "canvas.pt")
    jobs = [{"name": "sc", "folder": str(sc), "trust": True, "out": str(tmp_path / "sc.pt")},
            {"name": "untrusted", "folder": str(sc), "trust": False},
            {"name": "guarded", "folder": str(guarded), "trust": True}]
    run_isolated(STOCK, [json.dumps(jobs), str(tmp_path / "ctx.pt"), str(tmp_path / "canvas.pt"),
                         str(tmp_path / "results.json")], tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sc"]["experts"] == "QdlmFusedExperts" and results["sc"]["shared"]
    assert results["sc"]["calls"] == [2, 2, 2]  # each layer's experts: one encoder pass, one decoder pass
    want = logits(load(checkpoints["w3"]), ctx, canvas)
    assert rel(torch.load(tmp_path / "sc.pt"), want) <= 1e-6
    assert "trust_remote_code=True" in results["untrusted"]["message"]
    assert results["guarded"]["refused"] == "ImportError" and "pip install qdlm-export" in results["guarded"]["message"]


def _eager_experts(model, layer: int, weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """transformers' own DiffusionGemmaTextExperts holding ``weights`` (float64 from the format spec)
    in ``dtype``, and its eager forward (the class's forward dispatches on _experts_implementation)."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
        DiffusionGemmaTextExperts,
    )

    experts = DiffusionGemmaTextExperts(model.config.text_config).to(dtype)
    prefix = f"model.decoder.layers.{layer}.experts"
    with torch.no_grad():
        experts.gate_up_proj.copy_(weights[f"{prefix}.gate_up_proj"])
        experts.down_proj.copy_(weights[f"{prefix}.down_proj"])
    return lambda *args: DiffusionGemmaTextExperts.forward.__wrapped__(experts, *args)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "torch"), (torch.bfloat16, "torch"),
                                           (torch.float32, "triton")])
def test_fused_forward_is_transformers_eager_forward(checkpoints, dtype, backend, monkeypatch):
    """QdlmFusedExperts (the grouped expert GEMM over the stacks) against transformers' eager loop over
    the dequantized weights, on fresh routings with idle experts and slots routed to no expert (the
    index equal to the expert count, which transformers skips)."""
    from qdlm_export.kernels import refresh_backend_setting
    from tests.kernel_inputs import HAS_TRITON, fresh_generator

    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    folder = checkpoints["w3"]  # asymmetric, experts' down per-channel: zero points and both group layouts
    model = load(folder).to(dtype)
    fused = model.model.decoder.layers[1].experts
    eager = _eager_experts(model, 1, dequantized_checkpoint(folder), dtype)
    exact = _eager_experts(model, 1, dequantized_checkpoint(folder), torch.float64)
    monkeypatch.setenv("QDLM_KERNEL_BACKEND", backend)
    refresh_backend_setting()
    gen = fresh_generator()
    tokens, k, experts = 37, 2, fused.num_experts
    hidden = torch.randn(tokens, 256, generator=gen).to(dtype)
    index = torch.stack([torch.randperm(experts - 2, generator=gen)[:k] for _ in range(tokens)])  # 2 idle experts
    index[3, 1] = index[17, 0] = experts  # no expert for these slots
    index[5] = experts  # nor for any slot of token 5
    weights = torch.rand(tokens, k, generator=gen)  # float32, as the router gives them
    with torch.no_grad():
        got = fused(hidden, index, weights)
        want = eager(hidden, index, weights)
        truth = exact(hidden.double(), index, weights.double())
    assert got.dtype == dtype and fused.calls == 1
    if dtype == torch.float32:
        assert rel(got, want) <= 1e-5, f"{backend}: {rel(got, want):.2e}"
    else:  # bf16 rounds both; the grouped path is no farther from float64 than transformers' own loop
        assert rel(got, truth) <= 1.5 * rel(want, truth) + 1e-3
    assert not got[5].any() and got[3].abs().sum() > 0


def test_loading_reports_nothing_missing_and_dequantize_keeps_the_stacks_shared(source, checkpoints):
    """transformers reports no missing or unexpected key (the encoder has no copies); after
    ``dequantize()`` both stacks hold the same float modules, transformers' own fused experts with the
    dequantized weights, computing the float64 reference's logits."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
        DiffusionGemmaTextExperts,
    )

    folder = checkpoints["w4"]
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base, info = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the base model: names without "model."
    assert base.encoder.language_model.layers[2].experts is base.decoder.layers[2].experts
    ctx, canvas = inputs(41)
    quantized = logits(model.eval(), ctx, canvas)
    model.dequantize()
    model.set_experts_implementation("eager")
    dec, enc = model.model.decoder.layers[0], model.model.encoder.language_model.layers[0]
    assert type(dec.experts) is DiffusionGemmaTextExperts and enc.experts is dec.experts
    assert type(dec.self_attn.q_proj) is torch.nn.Linear and enc.self_attn.q_proj is dec.self_attn.q_proj
    dense = logits(model, ctx, canvas)
    assert rel(dense, quantized) <= 1e-5
    assert rel(dense, logits(reference_model(source, folder), ctx, canvas)) <= 1e-4


def test_a_missing_or_misshapen_stacked_tensor_is_refused_before_loading(checkpoints, tmp_path):
    from qdlm_export.errors import CheckpointError
    from qdlm_export.format.validation import validate_checkpoint

    for case in ("missing", "experts"):
        folder = tmp_path / case
        shutil.copytree(checkpoints["w4"], folder)
        file = folder / "model.safetensors"
        tensors = load_file(file)
        key = "model.decoder.layers.2.experts.down_proj.weight_scale"
        if case == "missing":
            del tensors[key]
        else:
            tensors[key] = tensors[key][:7].clone()  # one expert short
        save_file(tensors, file, metadata={"format": "pt"})
        for check in (load, validate_checkpoint):
            with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
                check(folder)


def test_inspect_lists_fused_experts_and_the_shared_weights_once(source, checkpoints, monkeypatch, capsys):
    """``inspect --json``: one stacked module per projection and block (its expert count and row split
    in ``fused_experts``), the shared weights listed once (nothing under the encoder), both stacks named
    in the kernel plans; the weight count is every expert's."""
    from tests.cli_runner import run_cli

    folder = checkpoints["w3"]
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(folder), "--json", "--device", "cpu")
    assert code == 0, err
    info = json.loads(out)
    layers = ADAPTER.num_layers(json.loads((folder / "config.json").read_text()))
    modules = info["quantized_modules"]
    assert not [m for m in modules if "encoder" in m or ".experts." in m.rsplit("experts", 1)[-1]]
    # per layer q, k, v (not in the full-attention layer), o, the MLP's three, the experts' two stacks
    assert len(modules) == len(set(modules)) == 9 * layers - 1
    assert sorted(info["fused_experts"]) == [f"model.decoder.layers.{i}.experts" for i in range(layers)]
    for name, entry in info["fused_experts"].items():
        assert entry["num_experts"] == 8 and entry["gate_up"]["rows"] == [64, 64] and entry["down"]["rows"] == [256]
        assert info["module_overrides"][f"{name}.down_proj"] == {"group_size": -1}  # 64 inputs, group 128
        assert "fused experts, 8 stacked (gate_proj/up_proj rows 64+64)" in info["kernels"][f"{name}.gate_up_proj"]
    assert info["shared_stack"] == {"alias": "model.encoder.language_model.", "stored": "model.decoder.",
                                    "modules": 8 * layers - 1}  # the linears and each layer's fused experts
    assert all("both stacks" in plan for plan in info["kernels"].values())
    # every expert's weights are counted: the source's dense linears and its 3-D expert tensors
    stored = load_tensors(source)
    assert info["linear_params"] == sum(t.numel() for n, t in stored.items()
                                        if n.endswith(("_proj.weight", "experts.gate_up_proj", "experts.down_proj"))
                                        and ".decoder.layers." in n and "router" not in n)
