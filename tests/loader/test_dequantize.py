"""``model.dequantize()`` of a loaded qdlm checkpoint: weight-only models become plain ``nn.Linear``
models computing what the quantized model computes, with the weights the format spec defines
(tests/reference.py); weight-activation models are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from qdlm_export.errors import CheckpointError
from qdlm_export.loader.hf_quantizer import QdlmLinear
from qdlm_export.quantize.api import make_config, quantize
from tests.reference import dequantized_weights


@pytest.mark.parametrize("family_config", [("llada", dict(bits=4, group_size=32, symmetric=False)),
                                           ("dream", dict(bits=3, group_size=64, symmetric=True))],
                         ids=["llada-w4-asym", "dream-w3-sym"])
def test_dequantize_weight_only(family_config, tiny_llada, tiny_dream, tmp_path):
    family, options = family_config
    source = {"llada": tiny_llada, "dream": tiny_dream}[family]
    out = tmp_path / "q"
    quantize(str(source), out, make_config("rtn", **options), trust_remote_code=True, verify=False)
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        quantized_logits = model(input_ids=tokens).logits
    names = [n for n, m in model.named_modules() if isinstance(m, QdlmLinear)]
    assert len(names) == 14

    model = model.dequantize()
    assert not any(isinstance(m, QdlmLinear) for m in model.modules())
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    reference = dequantized_weights(out)
    for name in names:
        linear = model.get_submodule(name)
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32
        torch.testing.assert_close(linear.weight.double(), reference[name], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        dense_logits = model(input_ids=tokens).logits
    rel = ((dense_logits - quantized_logits).norm() / quantized_logits.norm()).item()
    assert rel < 1e-5, rel
    # a plain model: it saves without a quantization_config and reloads as an ordinary float model
    model.save_pretrained(tmp_path / "dense")
    again = AutoModel.from_pretrained(tmp_path / "dense", trust_remote_code=True, dtype=torch.float32)
    assert not any(isinstance(m, QdlmLinear) for m in again.modules())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=tokens).logits, dense_logits)


def test_dequantize_to_a_requested_dtype(tiny_llada, tmp_path):
    out = tmp_path / "q"
    quantize(str(tiny_llada), out, make_config("rtn", bits=4), trust_remote_code=True, verify=False)
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).dequantize(dtype=torch.bfloat16)
    reference = dequantized_weights(out)
    for name, weight in reference.items():
        got = model.get_submodule(name).weight
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, weight.to(torch.bfloat16))


def test_weight_activation_checkpoints_refuse(tiny_llada, tmp_path):
    out = tmp_path / "q"
    quantize(str(tiny_llada), out, make_config("rtn-wa", bits=8, act_bits=8), trust_remote_code=True, verify=False)
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="activation quantization, which a plain Linear cannot hold") as err:
        model.dequantize()
    assert "weight-only" in err.value.hint
    assert any(isinstance(m, QdlmLinear) for m in model.modules())  # nothing was replaced
