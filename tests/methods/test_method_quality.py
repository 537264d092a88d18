"""GPTQ and AWQ against the RTN baseline on the tiny fixtures, block by block.

Each block's error is measured on held-out text (not the calibration windows), masked the way a dLLM
sees its input while denoising (as the default calibration is), with the source model's own block
inputs, so blocks are compared one by one (qdlm_export.quantize.fidelity)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qdlm_export.quantize.fidelity import block_output_errors
from qdlm_export.quantize.calibration import calibration_tokens
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.fixtures import MASK_ID, tokenizer_dir
from qdlm_export.quantize.api import make_config, quantize

CALIB = CalibrationConfig(nsamples=64, seqlen=128, seed=0)


@pytest.fixture(scope="module")
def held_out():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    return calibration_tokens(tok, CalibrationConfig(nsamples=8, seqlen=128, seed=12345, masking="random"), MASK_ID)


def errors(source, tmp_path, held_out, method, bits, symmetric):
    out = tmp_path / f"{method}-{bits}-{symmetric}"
    quantize(str(source), out, make_config(method, bits=bits, group_size=128, symmetric=symmetric),
             calibration=CALIB, trust_remote_code=True, verify=False)
    return block_output_errors(source, out, held_out)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_every_block(tiny_model, tmp_path, held_out, bits):
    family, source = tiny_model
    rtn = errors(source, tmp_path, held_out, "rtn", bits, True)
    gptq = errors(source, tmp_path, held_out, "gptq", bits, True)
    assert all(g <= r for g, r in zip(gptq, rtn)), f"{family} W{bits}: gptq {gptq} vs rtn {rtn}"
    if bits == 3:
        assert sum(gptq) <= 0.8 * sum(rtn), f"{family} W3: gptq {sum(gptq):.4f} vs rtn {sum(rtn):.4f}"


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_every_block(tiny_model, tmp_path, held_out, bits):
    family, source = tiny_model
    rtn = errors(source, tmp_path, held_out, "rtn", bits, False)
    awq = errors(source, tmp_path, held_out, "awq", bits, False)
    assert all(a <= r for a, r in zip(awq, rtn)), f"{family} W{bits}: awq {awq} vs rtn {rtn}"
    assert sum(awq) < 0.9 * sum(rtn)


def test_every_listed_linear_is_packed_by_gptq(tiny_llada, tmp_path):
    """The study's GPTQ silently left LLaDA's q/k/v in FP16; ours must pack every listed linear."""
    import json

    from qdlm_export.families import family_by_name
    from qdlm_export.format.validation import inspect_checkpoint

    out = tmp_path / "g"
    quantize(str(tiny_llada), out, make_config("gptq", bits=4), calibration=CALIB, trust_remote_code=True, verify=False)
    adapter = family_by_name("llada")
    expected = adapter.quantizable_linears(2)
    info = inspect_checkpoint(out)  # validates every tensor of every listed module
    assert info.quantized_modules == expected
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for name in expected:
        assert f"{name}.weight_packed" in keys and f"{name}.weight" not in keys
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "gptq"
