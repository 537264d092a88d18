"""Weight-activation methods on DiffusionGemma (RTN-WA W4A4, SmoothQuant W8A8, QuaRot and DuQuant
W4A4), through the installed ``quantize()`` on the tiny fixture (transformers' native ``diffusion_gemma``).

* The fused experts are stored **unstacked** (docs/FORMAT.md "Fused experts"): every expert's gate, up
  and down is an ordinary quantized linear with its own online ops and activation quantizer, and the
  block's ``fused_experts`` entry says ``"stacked": false``. The checkpoint reloads with
  ``from_pretrained``, both stacks computing with the very same modules (the experts included), and
  its canvas logits are what a float64 reference computes from the raw tensors: transformers' own model
  in float64 whose quantized linears apply docs/FORMAT.md's ops, activation quantizer and dequantized
  weight (tests/reference.py), its experts on a copy of transformers' eager loop. The folder's own
  loader copy does the same where qdlm_export cannot be imported. The stacking sink decides per block,
  by its first expert linear.
* Where the methods fold (docs/METHODS.md "DiffusionGemma"): each linear's effective weight (its
  online ops undone, times the gain of the norm it reads) is the source's, so SmoothQuant and DuQuant
  folded their scales into input_layernorm (q/k/v), pre_feedforward_layernorm (the MLP's gate/up),
  pre_feedforward_layernorm_2 (every expert's gate/up) and up -> down, while o_proj keeps its scale
  online (nothing crosses v_norm), q_norm/k_norm, the post-norms and the router are untouched, and
  QuaRot folds nothing.
* On held-out denoising error, W4A4 QuaRot and DuQuant beat RTN-WA W4A4.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.core.schemes import WeightScheme, quantize_rtn
from qdlm_export.errors import CheckpointError, ConfigError
from qdlm_export.families import family_by_name
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.format.config_schema import parse_quantization_config
from qdlm_export.format.stacked_experts import StackingSink
from qdlm_export.loader.fused_experts import QdlmUnstackedExperts
from qdlm_export.loader.hf_quantizer import QdlmLinear
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.calibration import calibration_tokens
from qdlm_export.quantize.denoising_calibration import (
    denoising_error,
    denoising_windows,
)
from tests.isolation import rel, run_isolated
from tests.loader.test_diffusion_gemma_loading import float64_model, inputs, logits
from tests.reference import dequantized_weights, fake_quant, load_tensors, spec_ops

ADAPTER = family_by_name("diffusion_gemma")
CALIB = CalibrationConfig(nsamples=8, seqlen=64, seed=0)
LAYERS, EXPERTS, PARTS = 3, 8, ("gate_proj", "up_proj", "down_proj")
# 64 divides every input (hidden 256, MLP 192, experts 64); 16 greedy steps keep the search short.
DUQUANT = {"block_size": 64, "max_rotation_steps": 16}
CONFIGS = {
    "rtn-wa": ("rtn-wa", {"bits": 4, "act_bits": 4}),
    "smoothquant": ("smoothquant", {}),  # W8A8, asymmetric weights and activations
    # RTN weights, as RTN-WA's: the comparison below measures the rotation. (GPTQ is no help on this
    # random fixture even weight-only: W4 per-channel GPTQ 0.74 vs RTN 0.64 held-out denoising error.)
    "quarot": ("quarot", {"weight_method": "rtn"}),
    "duquant": ("duquant", DUQUANT),
}
W4A4 = ("rtn-wa", "quarot", "duquant")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg-wa") / "src", seed=5)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("dg-wa-q")

    @functools.cache
    def make(tag: str) -> Path:
        method, options = CONFIGS[tag]
        out = root / tag
        quantize(str(source), out, make_config(method, **options), calibration=CALIB, verify=False, device="cpu")
        return out

    return make


def load(folder: Path, dtype: torch.dtype = torch.float32):
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()


def qconfig(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _own(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1:]: v.double() if v.is_floating_point() else v
            for k, v in tensors.items() if k.startswith(name + ".")}


# ---- the stacking sink's per-block decision ----------------------------------------------------------


class Recorder:
    def __init__(self):
        self.linears, self.tensors = {}, {}

    def add_linear(self, name, qweight):
        self.linears[name] = qweight

    def add_tensor(self, name, tensor):
        self.tensors[name] = tensor


def _expert_weights(block: int, weight_activation: bool, experts: int = 4, hidden: int = 64, inter: int = 32):
    gen = torch.Generator().manual_seed(block)
    out = {}
    for e in range(experts):
        for part, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            q = quantize_rtn(torch.randn(shape, generator=gen), WeightScheme(4, -1, True), torch.float16)
            if weight_activation:
                q.input_transforms = [{"op": "smooth"}, {"op": "quantize_input"}]
                q.extra_tensors = {"input_smooth": torch.rand(shape[1], generator=gen) + 0.5}
            out[f"model.decoder.layers.{block}.experts.{e}.{part}"] = q
    return out


def test_each_block_is_stacked_or_unstacked_by_its_first_expert():
    """A block whose first expert linear is weight-activation passes every expert linear through under
    its own name (a later weight-only one too) and is recorded ``"stacked": false`` with its row split;
    a weight-only block is stacked as before; an unstacked block missing an expert is refused, and the
    parser refuses an unstacked entry whose experts quantized_modules does not list."""
    inner = Recorder()
    sink = StackingSink(inner, ADAPTER, 4)
    wa, wo = _expert_weights(0, True), _expert_weights(1, False)
    late = "model.decoder.layers.0.experts.3.down_proj"
    wa[late] = wo[late.replace("layers.0", "layers.1")]  # weight-only, in a block already unstacked
    for name, q in [*wa.items(), *wo.items()]:
        sink.add_linear(name, q)
    section = sink.finish()
    assert list(inner.linears) == list(wa) and inner.linears[late] is wa[late]
    assert sorted(inner.tensors) == sorted(f"model.decoder.layers.1.experts.{p}.{t}" for p in ("gate_up_proj", "down_proj")
                                           for t in ("weight_packed", "weight_scale", "weight_shape"))
    assert section["model.decoder.layers.0.experts"] == {
        "num_experts": 4, "stacked": False,
        "gate_up": {"module": "gate_up_proj", "parts": ["gate_proj", "up_proj"], "rows": [32, 32]},
        "down": {"module": "down_proj", "parts": ["down_proj"], "rows": [64]}, "activation": "act_fn"}
    assert "stacked" not in section["model.decoder.layers.1.experts"]

    incomplete = StackingSink(Recorder(), ADAPTER, 4)
    for name, q in wa.items():
        if name != "model.decoder.layers.0.experts.2.up_proj":
            incomplete.add_linear(name, q)
    with pytest.raises(ConfigError, match=r"up_proj of the experts \[2\] was never quantized"):
        incomplete.finish()

    listed = [n for n in wa if n != "model.decoder.layers.0.experts.1.gate_proj"]
    qc = {"quant_method": "qdlm", "format_version": 1, "method": "rtn-wa", "quantized_modules": listed,
          "weights": {"bits": 4, "group_size": -1, "symmetric": True, "scale_dtype": "float16"},
          "fused_experts": {"model.decoder.layers.0.experts": section["model.decoder.layers.0.experts"]}}
    with pytest.raises(CheckpointError, match=r"experts.1.gate_proj is missing"):
        parse_quantization_config({"quantization_config": qc}, Path("config.json"))


# ---- the float64 reference of a weight-activation checkpoint ---------------------------------------


class FormatLinear(nn.Module):
    """docs/FORMAT.md's quantized linear ``name``, in float64 from the raw tensors: the online ops, the
    input quantizer, the dequantized weight (and the output quantizer of ``qkv_bits``)."""

    def __init__(self, name: str, qc: dict, tensors: dict[str, torch.Tensor], weight: torch.Tensor):
        super().__init__()
        self.ops, self.act = qc["transforms"]["modules"].get(name, []), qc["activations"]
        self.own, self.weight64 = _own(name, tensors), weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, own = self.act, self.own
        h = spec_ops(x.double(), self.ops, own)
        if {"op": "quantize_input"} in self.ops:
            static = act["granularity"] == "tensor"
            h = fake_quant(h, act["bits"], act["symmetric"], act["clip_ratio"],
                           own["input_scale"] if static else None, own.get("input_zero_point") if static else None)
        y = h @ self.weight64.T
        if {"op": "quantize_output"} in self.ops:
            y = fake_quant(y, act["qkv_bits"], act["symmetric"], act["clip_ratio"])
        return y


class EagerExperts(nn.Module):
    """transformers' eager loop of ``DiffusionGemmaTextExperts.forward`` over per-expert linears: each
    expert's tokens through ``down(gelu_tanh(gate x) * up x)``, times their routing weight, added."""

    def __init__(self, experts: list[dict[str, nn.Module]]):
        super().__init__()
        self.experts = nn.ModuleList(nn.ModuleDict(e) for e in experts)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            if len(token):
                x = hidden_states[token]
                y = expert["down_proj"](F.gelu(expert["gate_proj"](x), approximate="tanh") * expert["up_proj"](x))
                out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def reference_model(source: Path, folder: Path):
    """transformers' DiffusionGemma in float64 holding the checkpoint's full-precision tensors (norms
    the methods folded into, routers, each stack's layer_scalar...), every quantized linear of a decoder
    layer a :class:`FormatLinear` that the encoder layer computes with too, the experts :class:`EagerExperts`."""
    model = float64_model(source)
    qc, tensors, weights = qconfig(folder), load_tensors(folder), dequantized_weights(folder)
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in state and tensor.is_floating_point() and tensor.shape == state[name].shape:
                state[name].copy_(tensor)
    decoder, encoder = model.model.decoder.layers, model.model.encoder.language_model.layers
    for i, (dec, enc) in enumerate(zip(decoder, encoder, strict=True)):
        assert enc.input_layernorm.weight is dec.input_layernorm.weight  # transformers ties the stacks
        prefix = f"model.decoder.layers.{i}."
        experts: dict[int, dict[str, nn.Module]] = {}
        for name in (n for n in qc["quantized_modules"] if n.startswith(prefix)):
            local, linear = name[len(prefix):], FormatLinear(name, qc, tensors, weights[name])
            if local.startswith("experts."):
                _, expert, part = local.split(".")
                experts.setdefault(int(expert), {})[part] = linear
            else:
                _set(dec, local, linear)
                _set(enc, local, linear)
        dec.experts = enc.experts = EagerExperts([experts[e] for e in range(EXPERTS)])
    return model


# ---- the checkpoint and its reload -------------------------------------------------------------------


@pytest.mark.parametrize("tag", list(CONFIGS))
def test_reload_shares_every_module_and_computes_the_float64_reference(source, written, tag):
    """Every expert stored unstacked with its own input quantizer, the encoder listing nothing; the
    reload's encoder computes with the decoder's very modules; its canvas logits follow the float64
    reference (W8A8 reloaded in float64, the format's arithmetic; W4A4 in float32, how it is used)."""
    folder = written(tag)
    qc = qconfig(folder)
    listed = qc["quantized_modules"]
    assert not any(n.startswith("model.encoder.") or ".router" in n for n in listed)
    assert sorted(n for n in listed if ".experts." in n) == sorted(
        f"model.decoder.layers.{i}.experts.{e}.{p}" for i in range(LAYERS) for e in range(EXPERTS) for p in PARTS)
    assert all({"op": "quantize_input"} in qc["transforms"]["modules"][n] for n in listed)
    assert {m: entry["stacked"] for m, entry in qc["fused_experts"].items()} == {
        f"model.decoder.layers.{i}.experts": False for i in range(LAYERS)}
    assert not any(".experts.gate_up_proj" in k or ".experts.down_proj" in k for k in load_tensors(folder))

    model = load(folder, torch.float32 if tag in W4A4 else torch.float64)
    for dec, enc in zip(model.model.decoder.layers, model.model.encoder.language_model.layers, strict=True):
        assert isinstance(dec.experts, QdlmUnstackedExperts) and enc.experts is dec.experts
        assert all(isinstance(getattr(dec.experts[e], p), QdlmLinear) for e in range(EXPERTS) for p in PARTS)
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            assert isinstance(dec.get_submodule(path), QdlmLinear) and enc.get_submodule(path) is dec.get_submodule(path)

    reference = reference_model(source, folder)
    ctx, canvas = inputs(31)
    got, want = logits(model, ctx, canvas), logits(reference, ctx, canvas)
    original = logits(float64_model(source), ctx, canvas)
    err = rel(got, want)
    print(f"{tag}: reload vs float64 reference {err:.1e}, vs the float model {rel(got, original):.1e}")
    assert err <= 5e-3, f"{tag}: reload vs float64 reference {err:.2e}"
    assert rel(got, original) > 2 * err  # really quantized


ISOLATED = """
import json, sys
import torch, transformers

folder, ctx, canvas = sys.argv[1], torch.load(sys.argv[2]), torch.load(sys.argv[3])
model = transformers.AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
decoder, encoder = model.model.decoder.layers, model.model.encoder.language_model.layers
with torch.no_grad():
    torch.save(model(input_ids=ctx, decoder_input_ids=canvas).logits, sys.argv[4])
print(json.dumps({"experts": type(decoder[0].experts).__name__,
                  "shared": all(e.experts is d.experts for d, e in zip(decoder, encoder))}))
assert not [k for k in sys.modules if k.startswith("qdlm_export")]
print("isolated-ok")
"""


def test_the_checkpoint_loads_without_qdlm_export(written, tmp_path):
    """The folder's own loader copy (quantize writes it self-contained) carries the unstacked experts:
    with qdlm_export unimportable, DuQuant's checkpoint (smoothing, rotations, permutations) loads and
    computes the in-package logits."""
    folder = written("duquant")
    ctx, canvas = inputs(32)
    torch.save(ctx, tmp_path / "ctx.pt")
    torch.save(canvas, tmp_path / "canvas.pt")
    out = run_isolated(ISOLATED, [str(folder), str(tmp_path / "ctx.pt"), str(tmp_path / "canvas.pt"),
                                  str(tmp_path / "logits.pt")], tmp_path)
    assert json.loads(out.splitlines()[-2]) == {"experts": "QdlmUnstackedExperts", "shared": True}
    assert rel(torch.load(tmp_path / "logits.pt"), logits(load(folder), ctx, canvas)) <= 1e-6


# ---- where the transforms went ------------------------------------------------------------------------

NORM_READERS = {  # the norm a group reads -> its linears whose rows nothing else scales (up: with down)
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "pre_feedforward_layernorm": ("mlp.gate_proj",),
    "pre_feedforward_layernorm_2": tuple(f"experts.{e}.gate_proj" for e in range(EXPERTS)),
}
UNTOUCHED = ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "post_attention_layernorm.weight",
             "post_feedforward_layernorm.weight", "post_feedforward_layernorm_1.weight",
             "post_feedforward_layernorm_2.weight", "router.proj.weight", "router.scale", "router.per_expert_scale")


def source_weight(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A linear's float64 weight in the source, experts cut from the fused 3-D tensors."""
    if ".experts." not in name:
        return tensors[f"{name}.weight"].double()
    module, expert, part = name.rsplit(".", 2)
    if part == "down_proj":
        return tensors[f"{module}.down_proj"][int(expert)].double()
    gate_up = tensors[f"{module}.gate_up_proj"][int(expert)].double()
    rows = gate_up.shape[0] // 2
    return gate_up[:rows] if part == "gate_proj" else gate_up[rows:]


def effective_weight(qc: dict, tensors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                     name: str) -> torch.Tensor:
    """``M`` with ``linear(x) = x M^T`` before activation quantization: the dequantized weight with the
    online ops undone, ``W T^T`` for ``T`` the ops applied to the identity."""
    ops = [op for op in qc["transforms"]["modules"][name] if op["op"] not in ("quantize_input", "quantize_output")]
    weight = weights[name]
    return weight @ spec_ops(torch.eye(weight.shape[1], dtype=torch.float64), ops, _own(name, tensors)).T


@pytest.mark.parametrize("tag", ["smoothquant", "duquant", "quarot"])
def test_scales_fold_into_the_norms_each_group_reads_and_nothing_crosses_the_head_norms(source, written, tag):
    """Effective weights against the source's (within the weights' quantization error: W8 for
    SmoothQuant, W4 for the others). A norm's readers: ``M * g_stored == W * g_source`` column by
    column, where ignoring the stored gain would be far off (SmoothQuant and DuQuant folded their scales
    into exactly these norms; QuaRot none). up -> down: up's rows divided and down's columns multiplied
    by the same factors (the gate's rows untouched, checked with the norm). o_proj (behind v_norm) and every v_proj computing the source's
    function: nothing folded across v_norm; q_norm/k_norm, the post-norms and the router as stored."""
    folder, folds = written(tag), tag != "quarot"
    qc, stored, original = qconfig(folder), load_tensors(folder), load_tensors(source)
    weights = dequantized_weights(folder)
    tol = 0.02 if tag == "smoothquant" else 0.2  # measured: 0.007 and 0.14 (a wrong fold: over 1)

    def effective(name):
        return effective_weight(qc, stored, weights, name)

    for i in range(LAYERS):
        p = f"model.decoder.layers.{i}."
        for key in UNTOUCHED:
            assert torch.equal(stored[p + key], original[p + key]), p + key
        for norm, readers in NORM_READERS.items():
            g0, g1 = original[f"{p}{norm}.weight"].double(), stored[f"{p}{norm}.weight"].double()
            assert (not torch.equal(g0, g1)) == folds, f"{p}{norm}"
            for local in readers:
                if local == "self_attn.v_proj" and p + local not in weights:
                    continue  # full attention: the keys are the values
                m, w = effective(p + local), source_weight(original, p + local)
                err = rel(m * g1, w * g0)
                assert err <= tol, f"{p}{local}: effective weight vs source {err:.3f}"
                if folds:
                    assert rel(m * g0, w * g0) > 2 * err, f"{p}{local}: its norm's gain was not folded"
        for mlp in [p + "mlp."] + [f"{p}experts.{e}." for e in range(EXPERTS)]:
            norm = "pre_feedforward_layernorm" if mlp.endswith("mlp.") else "pre_feedforward_layernorm_2"
            gain = stored[f"{p}{norm}.weight"].double() / original[f"{p}{norm}.weight"].double()
            up, up0 = effective(mlp + "up_proj") * gain, source_weight(original, mlp + "up_proj")
            shrink = up.norm(dim=1) / up0.norm(dim=1)  # 1/s per channel: what up's rows were divided by
            if folds:
                assert (shrink - 1).abs().max() > 0.2, mlp  # up's rows took the down group's scale
            assert rel(up / shrink[:, None], up0) <= tol, mlp  # the same norm gain as gate's, rows apart
            down = effective(mlp + "down_proj") * shrink
            assert rel(down, source_weight(original, mlp + "down_proj")) <= tol, mlp
        o_proj = p + "self_attn.o_proj"
        assert rel(effective(o_proj), source_weight(original, o_proj)) <= tol
        ops = [op["op"] for op in qc["transforms"]["modules"][o_proj]]
        assert ("smooth" in ops) == folds  # its scale stays online: v_norm stands between it and v_proj
        if not folds:  # QuaRot: every input rotated online by H(in_features)
            for name in (n for n in qc["quantized_modules"] if n.startswith(p)):
                first = qc["transforms"]["modules"][name][0]
                assert first == {"op": "hadamard", "size": weights[name].shape[1], "stride": 1}, name


# ---- quality ---------------------------------------------------------------------------------------


def test_rotations_beat_rtn_wa_at_w4a4_on_heldout_denoising_error(source, written):
    """Relative error of the canvas logits on noised held-out windows (other text, other noise). The
    random fixture is chaotic (8-bit weight-only RTN is already at 0.17 here; a 1e-3 perturbation of
    layer 0's q_proj alone moves the logits by 0.1): every W4A4 error is large, the rotations' gain is
    a few percent, measured on every fixture seed tried (docs/METHODS.md "DiffusionGemma")."""
    original = load(source)
    tokens = calibration_tokens(transformers.AutoTokenizer.from_pretrained(source),
                                CalibrationConfig(nsamples=8, seqlen=64, seed=99))
    windows = denoising_windows(tokens, original.config, seed=7)
    errors = {tag: denoising_error(load(written(tag)), original, windows, batch_size=4) for tag in W4A4}
    print(f"W4A4 held-out denoising error {errors}")
    assert errors["quarot"] < 0.97 * errors["rtn-wa"], errors
    assert errors["duquant"] < 0.97 * errors["rtn-wa"], errors
