"""Weight-activation quantization quality on the outlier fixtures (4 residual channels x50, as real
LLMs have): what each method is for, measured as the relative error of the logits against the float
model on held-out masked inputs.

* W4A4: QuaRot's and DuQuant's error is at most half of plain RTN's (``rtn-wa``);
* W8A8: SmoothQuant's error is below RTN's.

The RTN baseline is the better of its symmetric and asymmetric variants (the methods differ in that
choice: QuaRot is symmetric, SmoothQuant and DuQuant asymmetric), so no method wins by format alone.
The held-out set has 16 sequences: with 4 the error of one model varies by ~10% from one draw of
inputs to the next, which is too noisy for a factor-two claim (see the slow variant).
"""

from __future__ import annotations

import functools

import pytest

from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.quantize.api import make_config
from tests import wa_helpers as H

HELD_OUT = CalibrationConfig(nsamples=16, seqlen=64, seed=7, masking="random")  # calibration: seed 0, clean
ASYM = {"symmetric": False, "act_symmetric": False}
CONFIGS = {
    "rtn-w4a4": ("rtn-wa", {"bits": 4, "act_bits": 4}),
    "rtn-w4a4-asym": ("rtn-wa", {"bits": 4, "act_bits": 4, **ASYM}),
    "quarot-w4a4": ("quarot", {}),  # defaults: W4A4, GPTQ weights with clip search
    "duquant-w4a4": ("duquant", {}),  # defaults: W4A4, 256 rotation steps, swc 0.8, lac 0.9
    "rtn-w8a8": ("rtn-wa", {}),  # defaults: W8A8
    "rtn-w8a8-asym": ("rtn-wa", ASYM),
    "smoothquant-w8a8": ("smoothquant", {}),  # defaults: W8A8, alpha 0.5
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def errors(family: str, seed: int = 3, held_out: CalibrationConfig = HELD_OUT) -> dict[str, float]:
    folder = H.outlier_model(family, seed=seed)
    ids = H.tokens(folder, held_out)
    ref = H.logits(H.load(folder), ids)
    result = {}
    for tag, (method, options) in CONFIGS.items():
        model = H.in_memory(folder, make_config(method, **options))
        result[tag] = H.rel(H.logits(model, ids), ref)
    print(f"\n{family} (fixture seed {seed}, {held_out.nsamples} held-out sequences): "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def check_w4a4(err: dict[str, float], method: str) -> None:
    rtn = min(err["rtn-w4a4"], err["rtn-w4a4-asym"])
    ratio = err[f"{method}-w4a4"] / rtn
    assert ratio <= 0.5, f"{method} W4A4 error {err[f'{method}-w4a4']:.4f} vs RTN {rtn:.4f}: ratio {ratio:.3f}"


def check_w8a8(err: dict[str, float]) -> None:
    rtn = min(err["rtn-w8a8"], err["rtn-w8a8-asym"])
    ratio = err["smoothquant-w8a8"] / rtn
    assert ratio <= 0.75, f"SmoothQuant W8A8 error {err['smoothquant-w8a8']:.4f} vs RTN {rtn:.4f}: ratio {ratio:.3f}"


@pytest.mark.parametrize("method", ["quarot", "duquant"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rotations_at_least_halve_rtn_w4a4_error(family, method):
    check_w4a4(errors(family), method)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_smoothquant_w8a8_beats_rtn_w8a8(family):
    check_w8a8(errors(family))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_quality_on_other_fixtures(family, seed):
    """Other draws of the outlier fixture. The factor two above is specific to the default fixture:
    with 4-bit per-token activations the rotated models sit at a floor (~0.2 here, set by the
    activations: QuaRot W4A8 is ~0.04) while RTN's error varies with the draw (0.43-0.65), e.g.
    Dream seed 5: RTN 0.43, QuaRot 0.23, DuQuant 0.26. What holds on every draw: the rotations
    remove at least a third of RTN's W4A4 error, and SmoothQuant W8A8 is below RTN W8A8."""
    err = errors(family, seed)
    rtn4 = min(err["rtn-w4a4"], err["rtn-w4a4-asym"])
    for method in ("quarot", "duquant"):
        assert err[f"{method}-w4a4"] <= 2 / 3 * rtn4, (method, err)
    assert err["smoothquant-w8a8"] < min(err["rtn-w8a8"], err["rtn-w8a8-asym"]), err
