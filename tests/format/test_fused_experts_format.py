"""Fused experts in the native format (format/stacked_experts.py, docs/FORMAT.md "Fused experts"):
the stacking sink writes each block's per-expert linears as the fused module's 3-D tensors (gate rows
then up rows, per expert), refuses what one stacked tensor cannot hold, and the config builder, the
parser and ``validate_checkpoint`` agree on the ``fused_experts`` / ``shared_stack`` sections. The
layout is checked against codes unpacked by tests/reference.py (docs/FORMAT.md), not the packer."""

from __future__ import annotations

import json
import random

import pytest
import torch

from qdlm_export.core.schemes import QuantizedWeight, WeightScheme, quantize_rtn
from qdlm_export.errors import CheckpointError, ConfigError
from qdlm_export.families import family_by_name
from qdlm_export.format.config_schema import (
    build_quantization_config,
    parse_quantization_config,
)
from qdlm_export.format.stacked_experts import StackingSink, shared_stack_section
from qdlm_export.format.validation import validate_checkpoint
from qdlm_export.format.writer import ShardedWriter
from tests.kernel_inputs import fresh_generator
from tests.reference import load_tensors, unpack_bits

ADAPTER = family_by_name("diffusion_gemma")
HIDDEN, INTER, EXPERTS = 64, 32, 4
BLOCK = "model.decoder.layers.{}.experts"


class Recorder:
    """A sink keeping what it is given."""

    def __init__(self):
        self.linears: dict[str, QuantizedWeight] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def add_linear(self, name, qweight):
        self.linears[name] = qweight

    def add_tensor(self, name, tensor):
        assert name not in self.tensors, f"{name} written twice"
        self.tensors[name] = tensor


def expert_weights(gen, blocks=2, scheme=None, scale_dtype=torch.float16):
    """The unfused view's quantized linears of ``blocks`` blocks, as the pipeline reports them
    (default scheme: 4-bit, group 16, asymmetric)."""
    scheme = scheme or WeightScheme(4, 16, False)
    out = {}
    for b in range(blocks):
        for e in range(EXPERTS):
            for part, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                                ("down_proj", (HIDDEN, INTER))):
                out[f"{BLOCK.format(b)}.{e}.{part}"] = quantize_rtn(torch.randn(shape, generator=gen), scheme,
                                                                    scale_dtype)
    return out


def test_stacks_every_tensor_gate_rows_then_up_rows_whatever_the_arrival_order():
    gen = fresh_generator()
    weights = expert_weights(gen)
    dense = quantize_rtn(torch.randn(HIDDEN, HIDDEN, generator=gen), WeightScheme(4, 16, False))
    inner = Recorder()
    sink = StackingSink(inner, ADAPTER, EXPERTS)
    order = list(weights.items())
    random.Random(gen.initial_seed()).shuffle(order)
    for name, qweight in order[:5]:
        sink.add_linear(name, qweight)
    sink.add_linear("model.decoder.layers.0.self_attn.q_proj", dense)  # passes through, as do tensors
    sink.add_tensor("model.decoder.layers.0.layer_scalar", torch.ones(1))
    for name, qweight in order[5:]:
        sink.add_linear(name, qweight)
    section = sink.finish()

    assert list(inner.linears) == ["model.decoder.layers.0.self_attn.q_proj"]
    for b in range(2):
        block = BLOCK.format(b)
        assert section[block] == {
            "num_experts": EXPERTS, "gate_up": {"module": "gate_up_proj", "parts": ["gate_proj", "up_proj"],
                                                "rows": [INTER, INTER]},
            "down": {"module": "down_proj", "parts": ["down_proj"], "rows": [HIDDEN]}, "activation": "act_fn"}
        assert list(section[block]) == ["num_experts", "gate_up", "down", "activation"]  # documented order
        for stacked, parts, cols in (("gate_up_proj", ("gate_proj", "up_proj"), HIDDEN), ("down_proj", ("down_proj",), INTER)):
            t = {s: inner.tensors[f"{block}.{stacked}.{s}"] for s in
                 ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
            rows = INTER * len(parts) if stacked == "gate_up_proj" else HIDDEN
            assert t["weight_shape"].tolist() == [[rows, cols]] * EXPERTS
            for e in range(EXPERTS):
                per = [weights[f"{block}.{e}.{p}"] for p in parts]
                assert torch.equal(unpack_bits(t["weight_packed"][e], 4, cols), torch.cat([q.codes for q in per]).long())
                assert torch.equal(t["weight_scale"][e], torch.cat([q.scale for q in per]))
                assert torch.equal(t["weight_zero_point"][e], torch.cat([q.zero_point for q in per]))
    assert "model.decoder.layers.0.layer_scalar" in inner.tensors


@pytest.mark.parametrize("case", ["group", "scale_dtype", "transforms", "bias", "gate_vs_up"])
def test_refuses_what_one_stacked_tensor_cannot_hold(case):
    gen = fresh_generator()
    weights = expert_weights(gen, blocks=1)
    odd = f"{BLOCK.format(0)}.2.{'up_proj' if case == 'gate_vs_up' else 'down_proj'}"
    w = torch.randn(weights[odd].shape, generator=gen)
    if case in ("group", "gate_vs_up"):  # a group-size fallback on one expert's linear
        weights[odd] = quantize_rtn(w, WeightScheme(4, -1, False), torch.float16)
    elif case == "scale_dtype":
        weights[odd] = quantize_rtn(w, WeightScheme(4, 16, False), torch.bfloat16)
    elif case == "transforms":
        weights[odd].input_transforms = [{"op": "quantize_input"}]
    else:
        weights[odd].bias = torch.zeros(w.shape[0])
    sink = StackingSink(Recorder(), ADAPTER, EXPERTS)
    with pytest.raises(ConfigError) as caught:
        for name, qweight in weights.items():
            sink.add_linear(name, qweight)
    message = str(caught.value)
    assert (odd in message) if case in ("transforms", "bias") else ("experts.2." in message and "one scheme" in message)
    assert caught.value.hint


def test_finish_refuses_an_incomplete_block():
    weights = expert_weights(fresh_generator(), blocks=1)
    sink = StackingSink(Recorder(), ADAPTER, EXPERTS)
    for name, qweight in weights.items():
        if name != f"{BLOCK.format(0)}.3.up_proj":
            sink.add_linear(name, qweight)
    with pytest.raises(ConfigError, match=r"up_proj of the experts \[3\]"):
        sink.finish()
    with pytest.raises(ConfigError, match="expert 4 of a module with 4 experts"):
        sink.add_linear(f"{BLOCK.format(1)}.4.gate_proj", weights[f"{BLOCK.format(0)}.0.gate_proj"])


def _checkpoint(folder, gen, *, down_group=-1):
    """A model-less checkpoint: one block's experts (down per-channel: an override) and one dense
    linear, written through the sink and described by build_quantization_config."""
    weights = expert_weights(gen, blocks=1, scheme=WeightScheme(4, 16, True))
    for e in range(EXPERTS):
        name = f"{BLOCK.format(0)}.{e}.down_proj"
        weights[name] = quantize_rtn(torch.randn(HIDDEN, INTER, generator=gen), WeightScheme(4, down_group, True),
                                     torch.float16)
    writer = ShardedWriter(folder)
    sink = StackingSink(writer, ADAPTER, EXPERTS)
    dense = "model.decoder.layers.0.mlp.up_proj"
    sink.add_linear(dense, quantize_rtn(torch.randn(INTER, HIDDEN, generator=gen), WeightScheme(4, 16, True),
                                       torch.float16))
    for name, qweight in weights.items():
        sink.add_linear(name, qweight)
    sink.add_tensor("model.decoder.norm.weight", torch.ones(HIDDEN))
    names = [dense, *weights]
    overrides = {n: {"group_size": -1} for n in names if n.endswith("down_proj")}
    qconfig = build_quantization_config(
        method="rtn", method_options={}, weights={"bits": 4, "group_size": 16, "symmetric": True,
                                                  "scale_dtype": "float16"},
        activations=None, family="diffusion_gemma", mask_token_id=None, logits_shift=False, quantized_modules=names,
        module_overrides=overrides, modules_not_converted=[], transforms={"modules": {n: [] for n in names}},
        calibration=None, provenance={}, fused_experts=sink.finish(), shared_stack=shared_stack_section(ADAPTER))
    writer.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma", "quantization_config": qconfig}))
    return qconfig


def test_config_lists_the_stacked_modules_and_validation_checks_them(tmp_path):
    qconfig = _checkpoint(tmp_path, fresh_generator())
    block = BLOCK.format(0)
    assert qconfig["quantized_modules"] == ["model.decoder.layers.0.mlp.up_proj", f"{block}.gate_up_proj",
                                            f"{block}.down_proj"]
    assert qconfig["module_overrides"] == {f"{block}.down_proj": {"group_size": -1}}
    assert qconfig["transforms"]["modules"] == {"model.decoder.layers.0.mlp.up_proj": []}
    assert qconfig["shared_stack"] == {"alias": "model.encoder.language_model.", "stored": "model.decoder."}
    assert list(qconfig)[-2:] == ["fused_experts", "shared_stack"]
    checked = validate_checkpoint(tmp_path)
    spec = checked.specs[f"{block}.down_proj"]
    assert (spec.experts, spec.out_features, spec.in_features, spec.group_size) == (EXPERTS, HIDDEN, INTER, -1)
    assert spec.tensors()["weight_packed"][1] == (EXPERTS, HIDDEN, INTER * 4 // 32)
    stored = load_tensors(tmp_path)
    assert not [k for k in stored if ".experts." in k and k.split(".experts.")[1][0].isdigit()]


@pytest.mark.parametrize("damage", ["rows", "listed", "alias", "dense_copy", "expert_shape"])
def test_damaged_sections_and_tensors_are_refused(tmp_path, damage):
    qconfig = _checkpoint(tmp_path, fresh_generator())
    block = BLOCK.format(0)
    config_file = tmp_path / "config.json"
    if damage == "rows":  # the row split no longer adds up to the stored rows
        qconfig["fused_experts"][block]["gate_up"]["rows"] = [INTER, INTER + 1]
        want = "weight_shape gives 64 rows per expert"
    elif damage == "listed":
        qconfig["quantized_modules"].remove(f"{block}.down_proj")
        want = "down_proj is not listed in quantized_modules"
    elif damage == "alias":
        qconfig["quantized_modules"].append("model.encoder.language_model.layers.0.mlp.up_proj")
        want = "under the shared stack's alias prefix"
    else:
        from safetensors.torch import save_file

        tensors = load_tensors(tmp_path)
        if damage == "dense_copy":  # a float copy of the fused parameter beside its packed stack
            tensors[f"{block}.gate_up_proj"] = torch.zeros(EXPERTS, 2 * INTER, HIDDEN)
            want = f"tensor {block}.gate_up_proj is present"
        else:  # one expert's recorded shape differs
            tensors[f"{block}.down_proj.weight_shape"][1, 1] += 1
            want = "gives the experts different shapes"
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config_file.write_text(json.dumps({"model_type": "diffusion_gemma", "quantization_config": qconfig}))
    with pytest.raises(CheckpointError, match=want):
        validate_checkpoint(tmp_path)
    if damage in ("listed", "alias"):  # the config alone is refused by the one parser
        with pytest.raises(CheckpointError, match=want):
            parse_quantization_config(json.loads(config_file.read_text()), config_file)
