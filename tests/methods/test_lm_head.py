"""``--include-lm-head`` quantizes the head with the chosen method, calibrated on the final norm's
inputs; errors are measured against the float64 head output on the same inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.families import family_by_name
from qdlm_export.methods import BlockCalibration, build_method, make_config
from qdlm_export.quantize.api import quantize
from tests.reference import dequantized_weights

ADAPTER = family_by_name("dense-decoder")
HEAD = "lm_head"
OUTLIERS = [5, 40, 99, 180]


class _RMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size).uniform_(0.5, 1.5))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _head_and_inputs(seed: int = 0, batches: int = 6):
    """A final norm and head (hidden 256, vocab 1024), and final hidden states with outlier channels."""
    torch.manual_seed(seed)
    norm, head = _RMSNorm(256), nn.Linear(256, 1024, bias=False)
    with torch.no_grad():
        norm.weight[OUTLIERS] *= 8.0  # the channels a head's inputs are known to carry outliers on
    g = torch.Generator().manual_seed(seed + 1)
    # Correlated channels (decaying spectrum), as real hidden states have: what GPTQ exploits.
    mix = torch.randn(256, 256, generator=g) * torch.logspace(0, -2, 256).unsqueeze(1)
    hidden = [torch.randn(1, 128, 256, generator=g) @ mix for _ in range(batches)]
    return norm, head, hidden


@torch.no_grad()
def _head_error(method: str, **options) -> float:
    """Relative error of the method's quantized head against the float64 original, on held-in inputs
    through the (possibly re-scaled) final norm -- the function the checkpoint computes."""
    norm, head, hidden = _head_and_inputs()
    reference = [head.weight.double() @ norm(h).double().reshape(-1, 256).t() for h in hidden]
    config = make_config(method, bits=3, group_size=128, **options)
    quantizer = build_method(config, ADAPTER, {}, scale_dtype=torch.float32)
    calib = BlockCalibration(hidden=list(hidden)) if quantizer.needs_calibration else None
    qweight = quantizer.quantize_head(norm, head, HEAD, calib)
    w = qweight.dequantize(torch.float64)
    num = sum((w @ norm(h).double().reshape(-1, 256).t() - r).pow(2).sum() for h, r in zip(hidden, reference))
    return (num / sum(r.pow(2).sum() for r in reference)).sqrt().item()


def test_gptq_and_awq_heads_beat_rtn_on_the_same_calibration():
    rtn = _head_error("rtn", symmetric=False)
    assert _head_error("gptq", symmetric=False) < 0.9 * rtn
    assert _head_error("awq") < 0.9 * rtn


def test_awq_head_folds_its_scale_into_the_final_norm():
    norm, head, hidden = _head_and_inputs()
    before = norm.weight.detach().clone()
    quantizer = build_method(make_config("awq", bits=3), ADAPTER, {}, scale_dtype=torch.float32)
    quantizer.quantize_head(norm, head, HEAD, BlockCalibration(hidden=hidden))
    assert not torch.equal(norm.weight.detach(), before)  # 1/s went into the model's own norm
    assert "alpha" in quantizer.search_log[":lm_head"]


def test_head_needs_calibration_where_the_method_does():
    norm, head, _ = _head_and_inputs()
    with pytest.raises(ValueError, match="calibration"):
        build_method(make_config("gptq"), ADAPTER, {}).quantize_head(norm, head, HEAD, None)


CALIB = CalibrationConfig(nsamples=8, seqlen=64, seed=0)


def test_gptq_head_in_a_checkpoint_round_trips_and_differs_from_rtn(tiny_llada, tmp_path):
    from transformers import AutoModel

    head = "model.transformer.ff_out"
    folders = {}
    for method in ("rtn", "gptq"):
        folders[method] = tmp_path / method
        quantize(str(tiny_llada), folders[method], make_config(method, bits=4, include_lm_head=True),
                 calibration=CALIB, trust_remote_code=True, verify=False)
        qc = json.loads((folders[method] / "config.json").read_text())["quantization_config"]
        assert head in qc["quantized_modules"] and head not in qc["modules_not_converted"]
    rtn_w, gptq_w = (dequantized_weights(folders[m])[head] for m in ("rtn", "gptq"))
    assert not torch.equal(rtn_w, gptq_w)  # the head went through GPTQ, not RTN

    # What from_pretrained computes equals the float64 original with the checkpoint's dequantized weights.
    model = AutoModel.from_pretrained(folders["gptq"], trust_remote_code=True, dtype=torch.float32)
    ref_model = AutoModel.from_pretrained(tiny_llada, trust_remote_code=True, dtype=torch.float64)
    for name, weight in dequantized_weights(folders["gptq"]).items():
        ref_model.get_submodule(name).weight.data = weight
    tokens = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = model(input_ids=tokens).logits.double(), ref_model(input_ids=tokens).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-3


def test_weight_activation_head_is_weight_only(tiny_llada, tmp_path):
    """W-A methods quantize the head with their weight quantizer; its input stays in float (no online
    transforms, no activation quantizer), documented in docs/METHODS.md."""
    from transformers import AutoModel

    from qdlm_export.loader.hf_quantizer import QdlmLinear

    head = "model.transformer.ff_out"
    out = tmp_path / "q"
    quantize(str(tiny_llada), out, make_config("rtn-wa", include_lm_head=True), trust_remote_code=True, verify=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert head in qc["quantized_modules"]
    assert head not in qc["transforms"]["modules"]
    assert "model.transformer.blocks.0.ff_out" in qc["transforms"]["modules"]
    module = AutoModel.from_pretrained(out, trust_remote_code=True).get_submodule(head)
    assert isinstance(module, QdlmLinear) and module.spec.input_activation is None
