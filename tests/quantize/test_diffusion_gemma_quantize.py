"""DiffusionGemma through the whole quantize stage: the installed ``qdlm-export`` quantizes a tiny model
(transformers' native ``diffusion_gemma``: a causal encoder and a bidirectional decoder over one set of
weights, fused 3-D experts) with every weight-only method, calibrating on the denoising path; the
checkpoint reloads with ``from_pretrained`` and computes what transformers' own model computes in float64
with the dequantized codes; GPTQ and AWQ beat RTN at W3 on held-out denoising error.

The reference model and the dequantization of the stacked experts are the loader tests'
(tests/loader/test_diffusion_gemma_loading.py): transformers' model in float64, its tied encoder getting
the decoder's dequantized weights by transformers' own tying, its eager per-expert loop.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.calibration import calibration_tokens
from qdlm_export.quantize.denoising_calibration import denoising_error, denoising_windows
from tests.isolation import rel
from tests.loader.test_diffusion_gemma_loading import inputs, load, logits, reference_model
from tests.reference import load_tensors

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("qdlm-export"))  # the installed entry point
CALIB = CalibrationConfig(nsamples=32, seqlen=128, seed=0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "src", seed=5)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("dg-q")

    @functools.cache
    def make(method: str, bits: int, attention: str = "auto") -> Path:
        out = root / f"{method}-w{bits}-{attention}"
        calibration = CalibrationConfig(nsamples=CALIB.nsamples, seqlen=CALIB.seqlen, seed=CALIB.seed,
                                        attention=attention)
        quantize(str(source), out, make_config(method, bits=bits, group_size=64), calibration=calibration,
                 verify=False, device="cpu")
        return out

    return make


def _reference(source: Path, folder: Path):
    """The float64 dequantized reference, with the checkpoint's own full-precision tensors too (AWQ folds
    its scales into the norms in front of the linears it smooths, and into up_proj before down_proj)."""
    model = reference_model(source, folder)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in load_tensors(folder).items():
            if name in params and tensor.is_floating_point() and tensor.shape == params[name].shape:
                if not any(name == f"{m}.weight" for m in json.loads(
                        (folder / "config.json").read_text())["quantization_config"]["quantized_modules"]):
                    params[name].copy_(tensor)
    return model


def _heldout_error(source: Path, folder: Path) -> float:
    """Relative error of the canvas logits on noised held-out windows (other text, other noise draws)."""
    original = load(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    tokens = calibration_tokens(tokenizer, CalibrationConfig(nsamples=8, seqlen=64, seed=99))  # other windows
    return denoising_error(load(folder), original, denoising_windows(tokens, original.config, seed=7), batch_size=2)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_reload_computes_the_float64_dequantized_reference(source, written, method):
    folder = written(method, 3)
    model, reference = load(folder), _reference(source, folder)
    ctx, canvas = inputs(31)
    assert rel(logits(model, ctx, canvas), logits(reference, ctx, canvas)) <= 1e-4
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["calibration" if method != "rtn" else "method"] is not None
    if method != "rtn":  # calibrated on the path the sampler runs
        assert config["calibration"]["attention"] == "denoising"
    # every block's 8 experts stacked; the encoder computes with the decoder's modules, stored once
    assert sorted(config["fused_experts"]) == [f"model.decoder.layers.{i}.experts" for i in range(3)]
    assert not any(name.startswith("model.encoder.") for name in config["quantized_modules"])


def test_gptq_and_awq_beat_rtn_at_w3_on_heldout_denoising_error(source, written):
    errors = {method: _heldout_error(source, written(method, 3)) for method in ("rtn", "gptq", "awq")}
    assert errors["gptq"] < 0.97 * errors["rtn"], errors
    assert errors["awq"] < 0.97 * errors["rtn"], errors


def test_encoder_only_calibration_is_the_causal_pattern(source, written):
    """--calib-attention causal: the peers' shortcut (the causal encoder on whole windows) still gives a
    working checkpoint, recorded as such; docs/calibration.md compares the two."""
    folder = written("gptq", 3, "causal")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["calibration"]["attention"] \
        == "causal"
    assert _heldout_error(source, folder) < 2.0


def test_the_installed_cli_quantizes_verifies_and_inspects(source, tmp_path):
    """The console script as a shell runs it: GPTQ W4 with verification (which compares canvas logits of
    noised windows against the source streamed block by block), then `inspect --json`."""
    out = tmp_path / "cli"
    done = subprocess.run([CONSOLE_SCRIPT, "quantize", str(source), "--out", str(out), "--method", "gptq",
                           "--bits", "4", "--group-size", "64", "--nsamples", "8", "--seqlen", "48", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert 0 < summary["relative_output_error"] < 1.5
    assert summary["verification_inputs"] == "4 noised canvases"  # no mask token: no "masked samples"
    report = json.loads((out / "qdlm_report.json").read_text())
    assert report["relative_output_error"] == pytest.approx(summary["relative_output_error"])
    shown = subprocess.run([CONSOLE_SCRIPT, "inspect", str(out), "--json"], capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    info = json.loads(shown.stdout)
    listed = info["quantized_modules"]
    assert len(listed) == len(set(listed))  # each shared weight once
    assert not any(name.startswith("model.encoder.") for name in listed)
    assert {name for name in listed if ".experts." in name} == {
        f"model.decoder.layers.{i}.experts.{p}" for i in range(3) for p in ("gate_up_proj", "down_proj")}
    assert {k: v["num_experts"] for k, v in info["fused_experts"].items()} == {
        f"model.decoder.layers.{i}.experts": 8 for i in range(3)}
    # the encoder layers of the reloaded model run the decoder's quantized modules
    model = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    for enc, dec in zip(model.model.encoder.language_model.layers, model.model.decoder.layers):
        assert enc.self_attn.q_proj is dec.self_attn.q_proj and enc.experts is dec.experts
