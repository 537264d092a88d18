"""Block-diffusion calibration (LLaDA2): the block-causal mask, the masked current block, the mask
reaching every block's forward, the option end to end, and dense families left as they were
(quantize/block_calibration.py, docs/calibration.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.errors import ConfigError
from qdlm_export.families import family_by_name
from qdlm_export.fixtures import MASK_ID, build_tiny_moe_model, tokenizer_dir
from qdlm_export.quantize.block_calibration import attention_mask, mask_current_blocks
from qdlm_export.quantize.calibration import calibration_tokens, calibration_windows
from qdlm_export.quantize.fidelity import prepare_folder_code
from qdlm_export.quantize.pipeline import capture_block_inputs
from tests.cli_runner import run_cli
from tests.isolation import rel

SCRIPT = Path(sys.executable).parent / "qdlm-export"
BLOCK = family_by_name("llada2_moe").block_length
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    return build_tiny_moe_model("llada2_moe", tmp_path_factory.mktemp("llada2") / "src", router_bias=True)


def _load(folder: Path, dtype=torch.float32):
    auto = family_by_name("llada2_moe").auto_class
    prepare_folder_code(folder, auto)
    return getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()


@pytest.mark.parametrize("seqlen, block", [(70, 32), (24, 8), (16, 32)])
def test_mask_is_block_causal(seqlen, block):
    """Position i attends to j iff block(j) <= block(i): built element by element, independently."""
    mask = attention_mask("block-causal", seqlen, block, dtype=torch.float64)
    assert mask.shape == (1, 1, seqlen, seqlen) and mask.dtype == torch.float64
    low = torch.finfo(torch.float64).min
    want = torch.tensor([[0.0 if j // block <= i // block else low for j in range(seqlen)] for i in range(seqlen)],
                        dtype=torch.float64)
    assert torch.equal(mask[0, 0], want)
    causal = attention_mask("causal", seqlen, dtype=torch.float32)[0, 0]
    assert torch.equal(causal == 0, torch.tensor([[j <= i for j in range(seqlen)] for i in range(seqlen)]))
    assert attention_mask("full", seqlen, block) is None


def test_masked_positions_follow_the_current_block(tokenizer):
    """None masked before the current block b, ceil(t * |b|) inside it (t the drawn ratio), all after;
    the unmasked tokens are the clean window's."""
    config = CalibrationConfig(nsamples=24, seqlen=100, seed=7)
    clean = calibration_tokens(tokenizer, CalibrationConfig(nsamples=24, seqlen=100, seed=7, masking="none"))
    assert not (clean == MASK_ID).any()  # the corpus never holds the mask token: every mask below was drawn
    tokens, draws = calibration_windows(tokenizer, config, MASK_ID, block_length=BLOCK)
    assert torch.equal(tokens, calibration_tokens(tokenizer, config, MASK_ID, block_length=BLOCK))
    assert len(draws) == 24 and {d.block for d in draws} == {0, 1, 2, 3}  # ceil(100 / 32) blocks, all drawn
    for row, draw in zip(range(24), draws):
        start, end = draw.block * BLOCK, min(100, (draw.block + 1) * BLOCK)
        masked = tokens[row] == MASK_ID
        assert not masked[:start].any() and masked[end:].all()
        assert 0 < draw.ratio <= 1
        assert int(masked[start:end].sum()) == draw.masked == math.ceil(draw.ratio * (end - start))
        assert torch.equal(tokens[row][~masked], clean[row][~masked])
    ratios = torch.tensor([d.ratio for d in draws])
    assert ratios.min() < 0.25 and ratios.max() > 0.75  # t ~ U(0, 1], not a constant
    # clean text under the block-causal mask: --calib-masking none
    none = calibration_tokens(tokenizer, CalibrationConfig(nsamples=24, seqlen=100, seed=7, masking="none"),
                              MASK_ID, block_length=BLOCK)
    assert torch.equal(none, clean)


def test_dense_windows_are_unchanged(tokenizer):
    """Families without a block length: 'auto' gives the windows of full attention, the same tokens as the
    documented forward process (seeded offsets, then t ~ U(0,1) and Bernoulli(t) masks per token)."""
    for masking in ("random", "none"):
        auto = CalibrationConfig(nsamples=16, seqlen=64, seed=5, masking=masking)
        full = CalibrationConfig(nsamples=16, seqlen=64, seed=5, masking=masking, attention="full")
        got = calibration_tokens(tokenizer, auto, MASK_ID)
        assert torch.equal(got, calibration_tokens(tokenizer, full, MASK_ID))
        assert torch.equal(got, calibration_tokens(tokenizer, full, MASK_ID, block_length=BLOCK))  # full ignores blocks
    clean = calibration_tokens(tokenizer, CalibrationConfig(nsamples=16, seqlen=64, seed=5, masking="none"))
    gen = torch.Generator().manual_seed(5)
    torch.randint(0, 10, (16,), generator=gen)  # the offsets' draw
    ratio = torch.rand(16, 1, generator=gen)
    expected = torch.where(torch.rand(clean.shape, generator=gen) < ratio, torch.full_like(clean, MASK_ID), clean)
    assert torch.equal(calibration_tokens(tokenizer, CalibrationConfig(nsamples=16, seqlen=64, seed=5), MASK_ID),
                       expected)
    for pattern in ("block-causal", "causal"):
        with pytest.raises(ConfigError, match=f"--calib-attention {pattern} applies to block-diffusion"):
            calibration_tokens(tokenizer, CalibrationConfig(nsamples=2, seqlen=16, attention=pattern), MASK_ID)
    with pytest.raises(ConfigError, match="--calib-attention 'sliding'"):
        CalibrationConfig(attention="sliding")


def test_captured_kwargs_carry_the_mask_and_block0_is_the_masked_model(llada2, tokenizer):
    """Block 0's recorded call arguments hold the block-causal mask, and re-running block 0 on them
    gives the model's own layer-0 output under that mask (float64); a block-causal run is not a full
    one, and later blocks cannot change earlier positions."""
    model = _load(llada2, torch.float64)
    blocks = family_by_name("llada2_moe").block_list(model)
    tokens = calibration_tokens(tokenizer, CalibrationConfig(nsamples=3, seqlen=64, seed=2), MASK_ID, BLOCK)
    mask = attention_mask("block-causal", 64, BLOCK, dtype=torch.float64)
    with torch.no_grad():
        calib = capture_block_inputs(model, blocks, tokens, 2, torch.device("cpu"), mask)
        assert [h.shape[0] for h in calib.hidden] == [2, 1]
        for kwargs, size in zip(calib.call_kwargs, (2, 1)):
            assert torch.equal(kwargs["attention_mask"], mask.expand(size, -1, -1, -1))
        outputs = calib.run(blocks[0])
        for start, out in zip((0, 2), outputs):
            batch = tokens[start : start + out.shape[0]]
            want = model(input_ids=batch, attention_mask=mask.expand(batch.shape[0], -1, -1, -1),
                         output_hidden_states=True).hidden_states[1]
            assert torch.allclose(out, want, rtol=0, atol=1e-12)
            full = model(input_ids=batch, output_hidden_states=True).hidden_states[1]
            assert rel(out, full) > 1e-3
        # positions of block 0 never see block 1: changing block 1 leaves them as they were
        changed = tokens[:1].clone()
        changed[:, BLOCK:] = torch.randint(3, 2000, (1, 64 - BLOCK), generator=torch.Generator().manual_seed(0))
        a, b = (model(input_ids=t, attention_mask=mask, output_hidden_states=True).hidden_states[-1] for t in
                (tokens[:1], changed))
        assert torch.allclose(a[:, :BLOCK], b[:, :BLOCK], rtol=0, atol=1e-12) and rel(a[:, BLOCK:], b[:, BLOCK:]) > 1e-3


def test_gptq_w4_block_causal_through_the_cli_reloads(llada2, tmp_path, monkeypatch, capsys):
    """The installed console script, in a subprocess: GPTQ W4 of the tiny LLaDA2 with
    --calib-attention block-causal reloads with from_pretrained and, on a block-causal masked window,
    computes logits close to the original's; the calibration record and the recipe say what was used,
    and the recipe reproduces the checkpoint."""
    assert SCRIPT.is_file(), f"the console script is not installed at {SCRIPT}"
    out = tmp_path / "w4"
    done = subprocess.run(
        [str(SCRIPT), "quantize", str(llada2), "--out", str(out), "--trust-remote-code", "--method", "gptq",
         "--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "64", "--calib-attention",
         "block-causal", "--no-verify", "--device", "cpu", "-q"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
    assert record["attention"] == "block-causal" and record["block_length"] == BLOCK and record["masking"] == "random"
    assert yaml.safe_load((out / "qdlm_recipe.yaml").read_text())["calib-attention"] == "block-causal"
    report = json.loads((out / "qdlm_report.json").read_text())
    assert report["calibration"]["attention"] == "block-causal"

    original, quantized = _load(llada2), _load(out)
    assert any(type(m).__name__ == "QdlmLinear" for m in quantized.modules())
    ids = torch.randint(3, 2000, (2, 64), generator=torch.Generator().manual_seed(9))
    ids[:, 40:] = MASK_ID  # current block 1 partly masked
    mask = attention_mask("block-causal", 64, BLOCK).expand(2, -1, -1, -1)
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask).logits
        got = quantized(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(got).all() and 0 < rel(got, want) < 0.2

    monkeypatch.chdir(llada2.parent)  # the recipe names the model folder by its name
    again = tmp_path / "again"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--config", str(out / "qdlm_recipe.yaml"), "--out",
                           str(again), "-q")
    assert code == 0, err
    assert json.loads((again / "config.json").read_text())["quantization_config"]["calibration"] == record
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # the previous behaviour, asked for, gives other weights: the pattern reached the calibration
    full = tmp_path / "full"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--config", str(out / "qdlm_recipe.yaml"), "--out",
                           str(full), "--calib-attention", "full", "-q")
    assert code == 0, err
    third = load_file(str(full / "model.safetensors"))
    assert any(not torch.equal(first[k], third[k]) for k in first if k.endswith("weight_packed"))


def test_block_causal_refused_for_a_model_without_blocks(monkeypatch, capsys, tmp_path):
    """The embedded tiny LLaDA attends bidirectionally over the whole window: the pattern is refused
    before any work, naming the option."""
    code, stdout, stderr = run_cli(monkeypatch, capsys, "quantize", "--out", str(tmp_path / "x"), "--method", "gptq",
                                   "--calib-attention", "block-causal", "--nsamples", "2", "--seqlen", "16")
    assert code != 0 and "--calib-attention block-causal" in stdout + stderr
    assert not (tmp_path / "x").exists()


def test_block_draws_are_seeded():
    tokens = torch.randint(3, 500, (5, 40), generator=torch.Generator().manual_seed(1))
    a, draws_a = mask_current_blocks(tokens, 16, MASK_ID, torch.Generator().manual_seed(3))
    b, draws_b = mask_current_blocks(tokens, 16, MASK_ID, torch.Generator().manual_seed(3))
    c, _ = mask_current_blocks(tokens, 16, MASK_ID, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and draws_a == draws_b and not torch.equal(a, c)
