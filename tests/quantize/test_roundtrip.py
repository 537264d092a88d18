"""quantize -> from_pretrained -> logits equal those of an independently dequantized float64 model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.loader.hf_quantizer import QdlmLinear
from qdlm_export.quantize.api import make_config, quantize
from tests.reference import dequantized_weights


def reference_logits(source, quantized, tokens):
    """The *original* model in float64 with every listed linear's weight replaced by the float64
    dequantization of the checkpoint's tensors (computed without qdlm_export)."""
    model = AutoModel.from_pretrained(source, trust_remote_code=True, dtype=torch.float64)
    for name, weight in dequantized_weights(quantized).items():
        model.get_submodule(name).weight.data = weight
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize(
    "bits,group,symmetric",
    [(4, 128, True), (3, 128, False), (2, 64, True), (8, -1, False), (4, 32, False)],
)
def test_round_trip_matches_float64_dequantized_reference(tiny_model, tmp_path, bits, group, symmetric):
    family, source = tiny_model
    out = tmp_path / "q"
    config = make_config("rtn", bits=bits, group_size=group, symmetric=symmetric)
    summary = quantize(str(source), out, config, trust_remote_code=True, verify=False)
    assert summary.quantized_modules == 14  # all 7 linears of both blocks

    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QdlmLinear)}
    listed = set(json.loads((out / "config.json").read_text())["quantization_config"]["quantized_modules"])
    assert quantized == listed
    # Memory is the packed size: no dense weight survives in a quantized linear.
    for name in quantized:
        assert not hasattr(model.get_submodule(name), "weight")

    tokens = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(bits * 7 + group))
    with torch.no_grad():
        got = model(input_ids=tokens).logits.double()
    ref = reference_logits(source, out, tokens)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= 1e-3, f"{family} W{bits} g{group}: relative error {rel:.2e}"


def test_save_pretrained_of_loaded_model_round_trips(tiny_llada, tmp_path):
    out = tmp_path / "q"
    quantize(str(tiny_llada), out, make_config("rtn", bits=4), trust_remote_code=True, verify=False)
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again", trust_remote_code=True, dtype=torch.float32)
    tokens = torch.randint(0, 2000, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, again(input_ids=tokens).logits)
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qdlm" and saved["quantized_modules"]


def test_lm_head_kept_unless_asked(tiny_llada, tmp_path):
    quantize(str(tiny_llada), tmp_path / "a", make_config("rtn"), trust_remote_code=True, verify=False)
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert "model.transformer.ff_out" in qc["modules_not_converted"]
    assert "model.transformer.ff_out" not in qc["quantized_modules"]
    # Block down projections share the name ff_out but are quantized.
    assert "model.transformer.blocks.0.ff_out" in qc["quantized_modules"]

    quantize(str(tiny_llada), tmp_path / "b", make_config("rtn", include_lm_head=True), trust_remote_code=True, verify=False)
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert "model.transformer.ff_out" in qc["quantized_modules"]
    model = AutoModel.from_pretrained(tmp_path / "b", trust_remote_code=True)
    assert isinstance(model.model.transformer.ff_out, QdlmLinear)


def test_sharded_output_has_index_and_reloads(tiny_dream, tmp_path):
    from qdlm_export.format.validation import inspect_checkpoint

    out = tmp_path / "q"
    quantize(str(tiny_dream), out, make_config("rtn", bits=4), trust_remote_code=True, verify=False,
             max_shard_bytes=400_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not list(out.glob("*.part"))
    info = inspect_checkpoint(out)
    assert len(info.quantized_modules) == 14
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens = torch.randint(0, 2000, (1, 12))
    with torch.no_grad():
        got = model(input_ids=tokens).logits.double()
    ref = reference_logits(tiny_dream, out, tokens)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-3


def test_dense_decoder_family_round_trip(tmp_path):
    """A plain Qwen2 causal LM (no remote code) quantizes and reloads with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from qdlm_export.fixtures import tokenizer_dir

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False)
    src = tmp_path / "qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(src)
    out = tmp_path / "q"
    summary = quantize(str(src), out, make_config("rtn", bits=4, symmetric=False), verify=True)
    assert summary.quantized_modules == 14 and summary.relative_output_error < 0.5
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["family"] == "dense-decoder" and qc["dllm"]["mask_token_id"] is None
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)
    for name, weight in dequantized_weights(out).items():
        ref_model.get_submodule(name).weight.data = weight
    tokens = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        got, ref = model(input_ids=tokens).logits.double(), ref_model(input_ids=tokens).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-3
