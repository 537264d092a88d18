"""The grouped mixture-of-experts path of the loader (loader/grouped_experts.py): a quantized LLaDA2
(``moe_infer`` replaced) and LLaDA-MoE (routing as family data, ``forward`` replaced) reload, their
routed experts run through the grouped expert GEMM, the logits equal the published per-expert loop's
and the float64 reference's (tests/families/test_moe_models.py, written from the published code, fed
the checkpoint's dequantized weights), and the experts' memory is the packed size, shared with the
per-expert modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.families import family_by_name
from qdlm_export.fixtures import build_tiny_moe_model
from qdlm_export.format.tensor_headers import read_safetensors_headers
from qdlm_export.kernels import refresh_backend_setting
from qdlm_export.loader import grouped_experts as ge
from qdlm_export.loader import hf_quantizer
from qdlm_export.loader.hf_quantizer import QdlmLinear
from qdlm_export.methods import make_config
from qdlm_export.quantize.api import quantize
from qdlm_export.quantize.fidelity import prepare_folder_code
from tests.families.test_moe_models import _dequantized_tensors, reference_logits
from tests.isolation import rel
from tests.kernel_inputs import DEV, fresh_generator, needs_triton

FAMILIES = ("llada2_moe", "lladamoe")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """RTN W4 g32: LLaDA2 symmetric with trained-like router biases, LLaDA-MoE asymmetric."""
    root = tmp_path_factory.mktemp("grouped-moe")
    out = {}
    for family, symmetric in (("llada2_moe", True), ("lladamoe", False)):
        source = build_tiny_moe_model(family, root / family, router_bias=family == "llada2_moe")
        out[family] = root / f"{family}-w4"
        quantize(str(source), out[family], make_config("rtn", bits=4, group_size=32, symmetric=symmetric),
                 trust_remote_code=True, verify=False, device="cpu")
    return out


def _load(folder: Path, family: str, monkeypatch=None, grouped: bool = True):
    """The checkpoint as from_pretrained loads it; ``grouped=False``: without the loader's after-load
    hooks, i.e. the published per-expert loop over QdlmLinear experts."""
    auto = family_by_name(family).auto_class
    prepare_folder_code(folder, auto)
    if not grouped:
        monkeypatch.setattr(hf_quantizer, "AFTER_LOAD_HOOKS", [])
    try:
        return getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    finally:
        if not grouped:
            monkeypatch.undo()


def _tokens(gen, n, length):
    return torch.randint(3, 2000, (n, length), generator=gen)


def _moe_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, ge.GROUPED, None), ge.GroupedExperts)}


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_path_runs_and_matches_the_loop_and_float64(checkpoints, family, monkeypatch):
    folder = checkpoints[family]
    grouped, loop = _load(folder, family), _load(folder, family, monkeypatch, grouped=False)
    cfg = json.loads((folder / "config.json").read_text())
    sparse = [f"model.layers.{i}.mlp" for i in range(cfg["num_hidden_layers"])
              if f"model.layers.{i}.mlp.experts.0.gate_proj" in cfg["quantization_config"]["quantized_modules"]]
    assert set(ge.expert_paths(grouped)) == set(sparse) and set(_moe_modules(grouped)) == set(sparse)
    assert ge.expert_paths(loop) == {}
    seen = []  # experts' row counts of every grouped pass
    sort = ge._sorted_by_expert

    def spy(topk_ids, experts):
        order, token, offsets = sort(topk_ids, experts)
        seen.append(offsets.diff())
        return order, token, offsets

    monkeypatch.setattr(ge, "_sorted_by_expert", spy)
    gen = fresh_generator()
    tensors = _dequantized_tensors(folder)
    for n, length in ((2, 24), (1, 3)):  # 3 tokens, top-2 of 8 experts: at least 2 experts idle
        seen.clear()
        ids = _tokens(gen, n, length)
        with torch.no_grad():
            got, want = grouped(input_ids=ids).logits, loop(input_ids=ids).logits
        assert len(seen) == len(sparse)  # every sparse block went through the grouped pass
        assert rel(got, want) <= 1e-6, f"grouped vs per-expert loop {rel(got, want):.2e}"
        err = rel(got, reference_logits(folder, tensors, ids, family))
        assert err <= 1e-3, f"grouped vs float64 reference {err:.2e}"
    assert all(int((counts == 0).sum()) >= 2 for counts in seen)
    assert all(m.calls == 2 for m in (getattr(mod, ge.GROUPED) for mod in _moe_modules(grouped).values()))


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_memory_is_the_packed_size_shared_with_the_expert_modules(checkpoints, family):
    folder = checkpoints[family]
    model = _load(folder, family)
    headers = read_safetensors_headers(sorted(str(p) for p in folder.glob("*.safetensors")))
    for name, module in _moe_modules(model).items():
        grouped = getattr(module, ge.GROUPED)
        stacks = [t for p in grouped.projections for t in p.tensors.values()]
        buffers = {f"{name}.experts.{e}.{part}.{suffix}": getattr(parts[i], suffix)
                   for p in grouped.projections for e, parts in enumerate(p.modules)
                   for i, part in enumerate(p.parts) for suffix in p.tensors}
        assert len(buffers) == len(headers_for(headers, name))
        # every per-expert buffer is a view into its projection's stack: no second copy
        stack_storages = {t.untyped_storage().data_ptr() for t in stacks}
        assert {b.untyped_storage().data_ptr() for b in buffers.values()} == stack_storages
        file_bytes = sum(headers_for(headers, name).values())
        assert sum(t.untyped_storage().nbytes() for t in stacks) == file_bytes == sum(
            b.numel() * b.element_size() for b in buffers.values())
        assert all(len(p.modules) == json.loads((folder / "config.json").read_text())["num_experts"]
                   for p in grouped.projections)


def headers_for(headers, block: str) -> dict[str, int]:
    """Bytes of the block's stacked expert tensors (packed codes, scales, zero points) in the files."""
    sizes = {"I32": 4, "U8": 1, "F16": 2, "BF16": 2, "F32": 4}
    out = {}
    for key, entry in headers.items():
        if key.startswith(block + ".experts.") and key.rsplit(".", 1)[1] in ("weight_packed", "weight_scale",
                                                                            "weight_zero_point"):
            out[key] = sizes[entry.dtype] * int(torch.tensor(entry.shape).prod())
    return out


@needs_triton
def test_triton_backend_in_the_loaded_model(checkpoints, monkeypatch):
    """The Triton kernels (compiled on a GPU, the model moved there: the stacks follow; else
    interpreted on the CPU) compute the loaded model's experts as the torch path does."""
    folder = checkpoints["llada2_moe"]
    model = _load(folder, "llada2_moe").to(DEV)
    ids = _tokens(fresh_generator(), 1, 6).to(DEV)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    monkeypatch.setenv("QDLM_KERNEL_BACKEND", "triton")
    refresh_backend_setting()
    used = []
    monkeypatch.setattr(ge, "grouped_expert_gemm", _recording(ge.grouped_expert_gemm, used))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert used and set(used) == {"triton"}
    assert rel(got, want) <= 1e-4


def _recording(op, used):
    from qdlm_export.kernels import select_backend

    def run(x, offsets, packed, scale, zero, bits, group_size, in_features):
        used.append(select_backend("grouped_expert_gemm", x.device, K=in_features, N=packed.shape[1],
                                   bits=bits, group_size=group_size, dtype=x.dtype).name)
        return op(x, offsets, packed, scale, zero, bits, group_size, in_features)

    return run


def test_an_expert_with_another_scheme_keeps_the_published_loop(checkpoints, monkeypatch):
    """Expert 1 of block 1 dequantized to a plain Linear (as a fallback expert of another scheme would
    be): that block keeps the published loop, the other is grouped, and the logits do not change."""
    folder = checkpoints["llada2_moe"]
    model = _load(folder, "llada2_moe", monkeypatch, grouped=False)
    ids = _tokens(fresh_generator(), 2, 10)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    odd = model.model.layers[1].mlp.experts[1]
    q = odd.gate_proj
    dense = torch.nn.Linear(q.in_features, q.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(q(torch.eye(q.in_features)).T)  # the same weight, dequantized
    odd.gate_proj = dense
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    paths = ge.group_experts(model, qconfig)
    assert paths["model.layers.1.mlp"].startswith("published per-expert loop: not every expert's gate_proj")
    assert paths["model.layers.2.mlp"] == "grouped"
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert rel(got, want) <= 1e-6 and getattr(model.model.layers[2].mlp, ge.GROUPED).calls == 1


def test_dequantize_and_moving_the_model(checkpoints):
    """``model.double()`` converts the experts' scales: the stacks are rebuilt and the grouped path
    matches the float64 reference 1000x closer than in float32; ``dequantize()`` replaces the experts: the published loop
    runs again on the dense weights."""
    folder = checkpoints["llada2_moe"]
    model = _load(folder, "llada2_moe").double()
    ids = _tokens(fresh_generator(), 2, 12)
    tensors = _dequantized_tensors(folder)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    grouped = [getattr(m, ge.GROUPED) for m in _moe_modules(model).values()]
    assert all(g.calls == 1 and g.projections[0].tensors["weight_scale"].dtype == torch.float64 for g in grouped)
    # float64 but for what the published code computes in float32 (the router's logits and weights)
    assert rel(got, reference_logits(folder, tensors, ids, "llada2_moe")) <= 1e-6
    model = _load(folder, "llada2_moe")
    with torch.no_grad():
        got = model(input_ids=ids).logits
    grouped = [getattr(m, ge.GROUPED) for m in _moe_modules(model).values()]
    model.dequantize()
    assert not any(isinstance(m, QdlmLinear) for m in model.modules())
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert all(g.calls == 1 for g in grouped) and rel(again, got) <= 1e-6


def test_lladamoe_expert_bias_routes_as_published(checkpoints, monkeypatch):
    """LLaDA-MoE's optional ``expert_bias`` (added to the router probabilities, which then weight the
    experts): the same random bias in both models, grouped and published loop agree."""
    folder = checkpoints["lladamoe"]
    grouped, loop = _load(folder, "lladamoe"), _load(folder, "lladamoe", monkeypatch, grouped=False)
    gen = fresh_generator()
    for a, b in zip(grouped.model.layers, loop.model.layers):
        bias = torch.randn(a.mlp.num_experts, generator=gen) * 0.05
        a.mlp.expert_bias, b.mlp.expert_bias = bias, bias.clone()
    ids = _tokens(gen, 2, 16)
    with torch.no_grad():
        got, want = grouped(input_ids=ids).logits, loop(input_ids=ids).logits
        unbiased = _load(folder, "lladamoe")(input_ids=ids).logits
    assert rel(got, want) <= 1e-6 and rel(got, unbiased) > 1e-4  # the bias changed the routing


def test_inspect_reports_the_grouped_path(checkpoints):
    """``inspect``'s kernel plans name the grouped GEMM for every routed expert linear, and the
    published loop (with the reason) where one expert's scheme differs."""
    import dataclasses

    from qdlm_export.format.validation import validate_checkpoint
    from qdlm_export.loader.kernel_choice import kernel_plans

    folder = checkpoints["llada2_moe"]
    plans = kernel_plans(folder, device="cpu", tokens=16)
    experts = [name for name in plans if ".mlp.experts." in name]
    assert len(experts) == 2 * 8 * 3
    assert all(plans[n].startswith("grouped over 8 experts: torch (per expert with tokens") for n in experts)
    assert not any("grouped" in plans[n] for n in plans if ".mlp.experts." not in n)
    specs = dict(validate_checkpoint(folder).specs)
    odd = "model.layers.2.mlp.experts.5.down_proj"
    specs[odd] = dataclasses.replace(specs[odd], group_size=-1)
    paths = ge.planned_paths(specs, "llada2_moe")
    assert paths[odd] == "published per-expert loop: the experts' schemes differ"
    assert paths["model.layers.2.mlp.experts.0.gate_proj"] == paths[odd]
    assert paths["model.layers.1.mlp.experts.5.down_proj"] == "grouped over 8 experts"


def test_bf16_on_the_cpu_keeps_the_faster_per_expert_kernels(checkpoints, monkeypatch):
    """A bf16 model on the CPU: the per-expert linears run torch's packed int4 kernels, which beat the
    grouped torch reference, so the published loop runs (and ``inspect`` says so); forcing the torch
    backend everywhere makes the grouped path run again. Both compute what the float64 reference does,
    within bf16 rounding."""
    from qdlm_export.format.validation import validate_checkpoint
    from qdlm_export.loader.kernel_choice import describe_kernels

    folder = checkpoints["llada2_moe"]
    auto = family_by_name("llada2_moe").auto_class
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    ids = _tokens(fresh_generator(), 2, 8)
    with torch.no_grad():
        per_expert = model(input_ids=ids).logits
    grouped = [getattr(m, ge.GROUPED) for m in _moe_modules(model).values()]
    assert [(g.calls, g.published_calls) for g in grouped] == [(0, 1)] * 2
    spec = validate_checkpoint(folder).specs["model.layers.1.mlp.experts.0.up_proj"]
    text = describe_kernels(spec, "cpu", 16, torch.bfloat16, "grouped over 8 experts")
    assert text.startswith("cpu_packed (") and text.endswith(
        "; published per-expert loop here: the per-expert kernels beat the grouped torch reference")
    assert describe_kernels(spec, "cpu", 16, torch.float32, "grouped over 8 experts").startswith(
        "grouped over 8 experts: torch (per expert with tokens")
    monkeypatch.setenv("QDLM_KERNEL_BACKEND", "torch")
    refresh_backend_setting()
    with torch.no_grad():
        forced = model(input_ids=ids).logits
    assert [(g.calls, g.published_calls) for g in grouped] == [(1, 1)] * 2
    want = reference_logits(folder, _dequantized_tensors(folder), ids, "llada2_moe")
    assert rel(per_expert, want) <= 8e-2 and rel(forced, want) <= 8e-2  # bf16 rounding through the whole model; a wrong kernel gives O(1)


def test_save_pretrained_of_a_grouped_model_writes_every_expert(checkpoints, tmp_path):
    """The per-expert buffers share one storage per projection; saving the loaded model still writes
    each expert's tensors, equal to the checkpoint's."""
    from tests.reference import load_tensors

    folder = checkpoints["lladamoe"]
    model = _load(folder, "lladamoe")
    assert _moe_modules(model)
    model.save_pretrained(tmp_path / "again")
    before, after = load_tensors(folder), load_tensors(tmp_path / "again")
    experts = [k for k in before if ".mlp.experts." in k]
    assert experts and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_importing_the_package_installs_the_grouped_path():
    """``import qdlm_export`` alone (a user's process) registers the after-load hook."""
    import subprocess
    import sys

    code = ("import qdlm_export\nfrom qdlm_export.loader.hf_quantizer import AFTER_LOAD_HOOKS\n"
            "print([h.__module__ + '.' + h.__name__ for h in AFTER_LOAD_HOOKS])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "qdlm_export.loader.grouped_experts.group_experts" in out
