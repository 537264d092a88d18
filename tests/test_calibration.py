"""Calibration sources, windowing and dLLM masking."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from qdlm_export.calibration import calibration_tokens, load_text
from qdlm_export.configs import CalibrationConfig
from qdlm_export.errors import ConfigError
from qdlm_export.fixtures import MASK_ID, tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    assert "alpha" in load_text(str(tmp_path)) and "beta" in load_text(str(tmp_path))
    assert load_text(str(tmp_path / "c.jsonl")) == "gamma\n\ndelta"
    assert len(load_text("default")) > 100_000
    with pytest.raises(ConfigError, match="no field 'body'"):
        load_text(str(tmp_path / "c.jsonl"), text_field="body")
    with pytest.raises(ConfigError, match="neither a file"):
        load_text(str(tmp_path / "missing.txt"))


def test_windows_are_corpus_slices_and_seeded(tokenizer):
    cfg = CalibrationConfig(nsamples=6, seqlen=64, seed=3)
    a = calibration_tokens(tokenizer, cfg)
    b = calibration_tokens(tokenizer, cfg)
    c = calibration_tokens(tokenizer, CalibrationConfig(nsamples=6, seqlen=64, seed=4))
    assert a.shape == (6, 64) and torch.equal(a, b) and not torch.equal(a, c)
    text = tokenizer.decode(a[0])
    assert text in load_text("default")  # a contiguous slice of the corpus


def test_random_masking_follows_the_forward_process(tokenizer):
    cfg = CalibrationConfig(nsamples=64, seqlen=128, seed=0, masking="random")
    clean = calibration_tokens(tokenizer, CalibrationConfig(nsamples=64, seqlen=128, seed=0))
    masked = calibration_tokens(tokenizer, cfg, mask_token_id=MASK_ID)
    changed = masked != clean
    assert torch.all(masked[changed] == MASK_ID)
    ratios = (masked == MASK_ID).float().mean(1)
    # t ~ U(0,1) per sample: ratios spread over (0, 1) with mean near 1/2.
    assert 0.35 < ratios.mean().item() < 0.65 and ratios.min() < 0.2 and ratios.max() > 0.8
    with pytest.raises(ConfigError, match="mask token"):
        calibration_tokens(tokenizer, cfg, mask_token_id=None)


def test_too_short_corpus(tokenizer, tmp_path):
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(ConfigError, match="fewer than --seqlen"):
        calibration_tokens(tokenizer, CalibrationConfig(source=str(tmp_path / "tiny.txt"), seqlen=512))


def test_auto_masking_masks_for_dllms_only(tokenizer):
    """The default, ``auto``: the dLLM forward process where the model has a mask token, clean text
    where it has none (plain autoregressive decoders)."""
    auto = CalibrationConfig(nsamples=16, seqlen=64, seed=1)
    assert auto.masking == "auto"
    assert auto.resolved_masking(MASK_ID) == "random" and auto.resolved_masking(None) == "none"
    clean = calibration_tokens(tokenizer, CalibrationConfig(nsamples=16, seqlen=64, seed=1, masking="none"), MASK_ID)
    assert torch.equal(calibration_tokens(tokenizer, auto, None), clean)
    masked = calibration_tokens(tokenizer, auto, MASK_ID)
    assert torch.equal(masked, calibration_tokens(tokenizer, CalibrationConfig(nsamples=16, seqlen=64, seed=1,
                                                                               masking="random"), MASK_ID))
    assert (masked == MASK_ID).any() and torch.all(masked[masked != clean] == MASK_ID)
    with pytest.raises(ConfigError, match="calib-masking"):
        CalibrationConfig(masking="sometimes")
