"""``--include-router``: mixture-of-experts routers stay in full precision unless asked, and are then
quantized like any other linear where they are one (LLaDA-MoE's ``mlp.gate`` is an ``nn.Linear``);
LLaDA2's router is a module of its own (grouped top-k inside), which no quantized linear can replace,
so the option is refused there, naming the module, before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.errors import ConfigError
from qdlm_export.fixtures import build_tiny_moe_model, build_tiny_model
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.fidelity import prepare_folder_code
from tests.isolation import rel
from tests.reference import dequantized_weights, load_tensors

SCRIPT = Path(sys.executable).parent / "qdlm-export"
CALIB = CalibrationConfig(nsamples=8, seqlen=64, seed=0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lladamoe(tmp_path_factory):
    return build_tiny_model("lladamoe", tmp_path_factory.mktemp("router") / "lladamoe", published=True)


def _routers(names) -> list[str]:
    return sorted(n for n in names if n.endswith(".mlp.gate"))


def _rtn_float64(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest as docs/FORMAT.md defines it, in float64: codes 0..2^b-1 around the
    zero point 2^(b-1), the scale of a group its max |w| over (2^b-1)/2."""
    w = weight.double().reshape(weight.shape[0], -1, group)
    levels, zero = 2**bits - 1, 2 ** (bits - 1)
    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / (levels / 2)
    codes = ((w / scale).round() + zero).clamp(0, levels)
    return ((codes - zero) * scale).reshape(weight.shape)


def test_include_router_quantizes_linear_routers_through_the_cli(lladamoe, tmp_path):
    assert SCRIPT.is_file(), f"the console script is not installed at {SCRIPT}"
    plain, routed = tmp_path / "plain", tmp_path / "routed"
    for out, extra in ((plain, []), (routed, ["--include-router"])):
        done = subprocess.run(
            [str(SCRIPT), "quantize", str(lladamoe), "--out", str(out), "--trust-remote-code", "--method", "rtn",
             "--bits", "4", "--group-size", "32", "--no-verify", "--device", "cpu", "-q", *extra],
            capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    source = load_tensors(lladamoe)
    layers = json.loads((lladamoe / "config.json").read_text())["num_hidden_layers"]
    expected = [f"model.layers.{i}.mlp.gate" for i in range(layers)]
    assert _routers(source_name[: -len(".weight")] for source_name in source if source_name.endswith(".weight")) == expected

    by_default = json.loads((plain / "config.json").read_text())["quantization_config"]["quantized_modules"]
    assert _routers(by_default) == []  # full precision unless asked
    listed = json.loads((routed / "config.json").read_text())["quantization_config"]["quantized_modules"]
    assert _routers(listed) == expected
    assert set(listed) - set(by_default) == set(expected)  # nothing else changes

    dense = dequantized_weights(routed)
    for name in expected:  # what the format holds is RTN of the source router, computed independently
        want = _rtn_float64(source[f"{name}.weight"], 4, 32)
        step = want.abs().amax() / 7.5
        off = (dense[name] - want).abs() > 1e-3 * step
        # a group's max |w| sits exactly on a rounding tie (+-7.5 steps): float32 and float64 may break it
        # apart, one step; anything else must agree
        assert off.float().mean() < 0.02 and ((dense[name] - want).abs() <= 1.01 * step).all(), name

    prepare_folder_code(routed, "AutoModelForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(routed, trust_remote_code=True, dtype=torch.float32)
    assert all(type(model.get_submodule(name)).__name__ == "QdlmLinear" for name in expected)
    x = torch.randn(5, source[f"{expected[0]}.weight"].shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.get_submodule(expected[0])(x).double()
    assert rel(got, x.double() @ dense[expected[0]].T) < 1e-4
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_include_router_with_gptq_calibrates_the_router(lladamoe, tmp_path):
    out = tmp_path / "gptq"
    quantize(str(lladamoe), out, make_config("gptq", bits=3, group_size=32, include_router=True), calibration=CALIB,
             trust_remote_code=True, verify=False, device="cpu")
    listed = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_modules"]
    routers = _routers(listed)
    assert routers
    source, dense = load_tensors(lladamoe), dequantized_weights(out)
    for name in routers:  # GPTQ moves weights off the RTN grid point: it used the router's inputs
        assert not torch.allclose(dense[name], _rtn_float64(source[f"{name}.weight"], 3, 32), atol=1e-6)
        assert rel(dense[name], source[f"{name}.weight"].double()) < 0.5


def test_include_router_is_refused_where_the_router_is_not_a_linear(tmp_path):
    model = build_tiny_moe_model("llada2_moe", tmp_path / "llada2_moe")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"router model\.layers\.\d+\.mlp\.gate of LLaDA2 models is a \w+, not a linear"):
        quantize(str(model), out, make_config("rtn", bits=4, group_size=32, include_router=True),
                 trust_remote_code=True, verify=False, device="cpu")
    assert not out.exists()


def test_include_router_is_refused_for_dense_models(tmp_path):
    model = build_tiny_model("llada", tmp_path / "llada")
    with pytest.raises(ConfigError, match="have no mixture-of-experts router"):
        quantize(str(model), tmp_path / "out", make_config("rtn", bits=4, group_size=32, include_router=True),
                 trust_remote_code=True, verify=False, device="cpu")
