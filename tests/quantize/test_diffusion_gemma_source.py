"""DiffusionGemma as the quantize stage reads it (quantize/source.py, fused_experts.py, shared_stack_view.py).

The checkpoint stores each layer's experts fused ([E, 2I, H] gate rows then up rows, [E, H, I]) and the
text weights once, under the decoder; the causal encoder computes with the same weights. Quantization
sees one 2-D linear per expert (virtual keys slicing the stored tensors, an unfused module computing
what transformers' fused one computes) and materialises encoder layer i with decoder block i, sharing
its modules. References: a float64 recomputation of the experts from the stored tensors, transformers'
own fused module (each of its experts implementations), and the model from_pretrained loads.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qdlm_export  # noqa: F401  (registrations)
from qdlm_export.families.base import FusedExperts
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.quantize.fused_experts import EAGER, TOP_K_SUM, UnfusedExperts, fuse, split_fused, unfuse_experts
from qdlm_export.quantize.shared_stack_view import share_modules
from qdlm_export.quantize.source import SourceModel
from tests.kernel_inputs import fresh_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]  # the fixture's 3 layers
EXPERTS, TOP_K, HIDDEN, MOE_INTER = 8, 2, 256, 64
DECODER, ENCODER = "model.decoder.layers", "model.encoder.language_model.layers"
# The text layer's parameter-owning modules, from the published modeling code: the same classes in both
# stacks except the attention (the encoder's is causal and writes the cache), whose projections and
# norms are shared one by one; v_proj exists in sliding layers only.
SHARED = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
          "self_attn.k_norm", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm", "router", "experts", "post_feedforward_layernorm_1",
          "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny DiffusionGemma, with each encoder layer_scalar made different from its decoder's (the
    fixture stores equal values): each stack's own stored buffer must reach that stack."""
    built = build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "built", seed=11)
    out = tmp_path_factory.mktemp("dg") / "distinct-scalars"
    shutil.copytree(built, out, dirs_exist_ok=True)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    for i in range(len(LAYER_TYPES)):
        tensors[f"{ENCODER}.{i}.layer_scalar"] = tensors[f"{DECODER}.{i}.layer_scalar"] * (1.25 + 0.25 * i)
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def source(folder):
    return SourceModel.open(str(folder))


@pytest.fixture(scope="module")
def loaded(folder):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _stored(folder, key):
    (shard,) = folder.glob("*.safetensors")
    with safe_open(str(shard), "pt") as h:
        return h.get_tensor(key)


def _experts_reference(gate_up, down, x, index, weights):
    """float64, token by token: sum over the token's k experts of weight * down(gelu_tanh(gate x) * up x)."""
    gate_up, down, x, weights = gate_up.double(), down.double(), x.double(), weights.double()
    inter = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            h = F.gelu(gate_up[e, :inter] @ x[t], approximate="tanh") * (gate_up[e, inter:] @ x[t])
            out[t] += weights[t, slot] * (down[e] @ h)
    return out


def _experts_with(layer, implementation, dtype):
    """A copy of ``layer`` in ``dtype`` whose fused experts run transformers' ``implementation``."""
    layer = copy.deepcopy(layer).to(dtype)
    layer.experts.config = copy.copy(layer.experts.config)
    layer.experts.config._experts_implementation = implementation
    return layer


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_the_unfused_view_computes_what_the_fused_experts_compute(loaded, implementation):
    assert loaded.config.text_config._experts_implementation == "grouped_mm"  # what from_pretrained runs
    gen = fresh_generator()
    # float64: both against a recomputation (grouped_mm has no float64 kernel: it is checked below)
    layer = _experts_with(loaded.model.decoder.layers[1], implementation, torch.float64)
    x = torch.randn(40, HIDDEN, generator=gen, dtype=torch.float64)
    _, weights, index = layer.router(x)
    want = _experts_reference(layer.experts.gate_up_proj, layer.experts.down_proj, x, index, weights)
    with torch.no_grad():
        fused = layer.experts(x, index, weights) if implementation != "grouped_mm" else None
        view = unfuse_experts(layer, FusedExperts())
        got = view(x, index, weights)
    assert view is layer.experts and isinstance(view, UnfusedExperts) and len(view) == EXPERTS
    assert view.accumulate == (EAGER if implementation == "eager" else TOP_K_SUM)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    if fused is not None:
        torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-14)
    # bf16: the view adds up its experts as this implementation does (transformers' eager loop rounds each
    # expert's share to bf16; grouped_mm and batched_mm sum the k shares in float32, then round once)
    layer = _experts_with(loaded.model.decoder.layers[1], implementation, torch.bfloat16)
    x = torch.randn(64, HIDDEN, generator=gen).bfloat16()
    _, weights, index = layer.router(x)
    with torch.no_grad():
        fused = layer.experts(x, index, weights)
        got = unfuse_experts(layer, FusedExperts())(x, index, weights)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, fused, rtol=0, atol=0)


def test_split_and_fuse_map_the_stored_layout_both_ways():
    gen = fresh_generator()
    gate_up, down = torch.randn(EXPERTS, 2 * MOE_INTER, HIDDEN, generator=gen), torch.randn(EXPERTS, HIDDEN, MOE_INTER)
    gate, up, same_down = split_fused(gate_up, down)
    assert torch.equal(gate[3], gate_up[3, :MOE_INTER]) and torch.equal(up[3], gate_up[3, MOE_INTER:])
    assert same_down is down and gate.data_ptr() == gate_up.data_ptr()  # views, nothing copied
    for back in (fuse(gate, up, down), fuse(list(gate), list(up), list(down))):
        assert torch.equal(back[0], gate_up) and torch.equal(back[1], down)
    packed = torch.randint(0, 2**31 - 1, (EXPERTS, 2 * MOE_INTER, HIDDEN // 8), generator=gen, dtype=torch.int32)
    assert torch.equal(fuse(*split_fused(packed, down))[0], packed)  # trailing dims of a packed layout kept


def test_unfusing_a_meta_module_allocates_nothing_and_keeps_its_dtype(loaded):
    with torch.device("meta"):
        layer = copy.deepcopy(loaded.model.decoder.layers[0]).to(device="meta", dtype=torch.bfloat16)
    act = layer.experts.act_fn
    view = unfuse_experts(layer, FusedExperts())
    assert layer.experts is view and unfuse_experts(layer, FusedExperts()) is view  # idempotent
    assert list(view) == [view[e] for e in range(EXPERTS)] and view[-1] is view[EXPERTS - 1]
    for expert in view:
        assert expert.act_fn is act
        shapes = {n: (p.shape, p.dtype, p.device.type) for n, p in expert.named_parameters()}
        assert shapes == {"gate_proj.weight": ((MOE_INTER, HIDDEN), torch.bfloat16, "meta"),
                          "up_proj.weight": ((MOE_INTER, HIDDEN), torch.bfloat16, "meta"),
                          "down_proj.weight": ((HIDDEN, MOE_INTER), torch.bfloat16, "meta")}
        assert all(type(m) is torch.nn.Linear and m.bias is None for m in expert.children() if m is not act)


def test_keys_serve_one_2d_tensor_per_expert_linear(folder, source):
    keys = source.keys()
    assert not [k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for i in range(len(LAYER_TYPES)):
        block = f"{DECODER}.{i}"
        gate_up, down = _stored(folder, f"{block}.experts.gate_up_proj"), _stored(folder, f"{block}.experts.down_proj")
        assert not source.has(f"{block}.experts.gate_up_proj")
        with pytest.raises(KeyError):
            source.tensor(f"{block}.experts.down_proj")
        assert torch.equal(source.stored_tensor(f"{block}.experts.down_proj"), down)  # stored names stay readable
        for e in range(EXPERTS):
            want = {"gate_proj": gate_up[e, :MOE_INTER], "up_proj": gate_up[e, MOE_INTER:], "down_proj": down[e]}
            for linear, tensor in want.items():
                key = f"{block}.experts.{e}.{linear}.weight"
                assert key in keys and source.has(key)
                assert source.tensor_meta(key) == ("F32", list(tensor.shape))
                assert torch.equal(source.tensor(key), tensor), key
    # every expert of every block once, q/k/o everywhere, v in sliding layers only, the dense MLP
    for i, kind in enumerate(LAYER_TYPES):
        block = f"{DECODER}.{i}"
        attention = ["q_proj", "k_proj"] + (["v_proj"] if kind == "sliding_attention" else []) + ["o_proj"]
        want = [f"{block}.self_attn.{n}" for n in attention] + [f"{block}.mlp.{n}" for n in
                                                                 ("gate_proj", "up_proj", "down_proj")]
        want += [f"{block}.experts.{e}.{n}" for e in range(EXPERTS) for n in ("gate_proj", "up_proj", "down_proj")]
        got = source.adapter.stored_linears(i, keys)
        assert sorted(got) == sorted(want) and len(got) == len(set(got))


def test_the_skeleton_holds_the_unfused_view_in_both_stacks(source):
    model = source.skeleton()
    for stack in (DECODER, ENCODER):
        for i in range(len(LAYER_TYPES)):
            experts = model.get_submodule(f"{stack}.{i}.experts")
            assert isinstance(experts, UnfusedExperts) and len(experts) == EXPERTS
    assert all(p.device.type == "meta" for p in model.parameters())
    prefixes = source.non_block_prefixes(model)
    assert not [p for p in prefixes if p.startswith((DECODER + ".", ENCODER + "."))]
    assert {"model.encoder.language_model.embed_tokens", "model.encoder.language_model.norm"} <= set(prefixes)


def test_a_block_brings_its_shared_layer_which_computes_with_its_modules(folder, source):
    model = source.skeleton()
    source.materialize(model, f"{DECODER}.1", CPU, torch.float32)
    block, shared = model.get_submodule(f"{DECODER}.1"), model.get_submodule(f"{ENCODER}.1")
    for name in SHARED:
        assert shared.get_submodule(name) is block.get_submodule(name), name
    assert type(shared.self_attn) is not type(block.self_attn)  # the encoder's attention stays its own
    assert sorted(share_modules(block, shared)) == sorted(SHARED)  # idempotent: the same names
    assert torch.equal(shared.layer_scalar, _stored(folder, f"{ENCODER}.1.layer_scalar"))  # its own buffer
    assert torch.equal(block.layer_scalar, _stored(folder, f"{DECODER}.1.layer_scalar"))
    assert not torch.equal(shared.layer_scalar, block.layer_scalar)
    live = {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"}
    assert live and all(n.startswith((f"{DECODER}.1.", f"{ENCODER}.1.")) for n in live)  # one layer pair only
    # a module a method replaces in the block reaches the shared layer at the next share_modules call
    wrapped = type("Wrapped", (torch.nn.Module,), {"forward": lambda self, x: self.inner(x)})()
    wrapped.inner = block.self_attn.q_proj
    block.self_attn.q_proj = wrapped
    assert "self_attn.q_proj" in share_modules(block, shared) and shared.self_attn.q_proj is wrapped
    source.release(model, f"{DECODER}.1")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_materialised_block_by_block_the_skeleton_computes_the_loaded_model(folder, source, loaded):
    model = source.skeleton()
    for prefix in source.non_block_prefixes(model):
        source.materialize(model, prefix, CPU, torch.float32)
    text = model.model.encoder.language_model
    assert text.embed_tokens is model.model.decoder.embed_tokens and text.norm is model.model.decoder.norm
    for i in range(len(LAYER_TYPES)):
        source.materialize(model, source.adapter.block_prefix(i), CPU, torch.float32)
    # each stored weight held once, as in the tied model (the skeleton's own LM head aside)
    held = {id(p): p.numel() for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("lm_head")}
    assert sum(held.values()) == sum(p.numel() for p in loaded.parameters())
    gen = fresh_generator()
    vocab = loaded.config.text_config.vocab_size
    context = torch.randint(0, vocab, (2, 20), generator=gen)  # longer than the sliding window (16)
    canvas = torch.randint(0, vocab, (2, loaded.config.canvas_length), generator=gen)
    with torch.no_grad():
        want = loaded(input_ids=context, decoder_input_ids=canvas).logits
        got = model(input_ids=context, decoder_input_ids=canvas).logits
    # float32 throughout; the expert GEMMs differ from grouped_mm's only in rounding order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
