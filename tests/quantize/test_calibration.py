"""Calibration sources, windowing and dLLM masking."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from qdlm_export.quantize.calibration import calibration_tokens, load_text
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.errors import ConfigError, InputDataError
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
    with pytest.raises(InputDataError, match="no field 'body'"):
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


# --- calibration data checked at the door --------------------------------------------------------

def test_text_files_must_be_utf8_text(tmp_path):
    """Binary, NUL-filled, UTF-16 and Latin-1 files are refused naming what they look like; a UTF-8
    BOM is dropped; text is returned byte-exact otherwise."""
    text = "plain words, then caf\u00e9 na\u00efve r\u00e9sum\u00e9\n" * 3
    (tmp_path / "ok.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_text(str(tmp_path / "ok.txt")) == text
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(InputDataError, match=f"not UTF-8 \\(byte 0xE9 at offset {offset}\\)") as err:
        load_text(str(tmp_path / "latin1.txt"))
    assert "iconv" in err.value.hint
    data = bytearray(torch.randint(32, 127, (500,), generator=torch.Generator().manual_seed(5)).to(torch.uint8).numpy())
    data[321] = 0
    (tmp_path / "nul.txt").write_bytes(bytes(data))
    with pytest.raises(InputDataError, match="looks binary \\(NUL bytes at offset 321\\)"):
        load_text(str(tmp_path / "nul.txt"))
    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    with pytest.raises(InputDataError, match="UTF-16"):
        load_text(str(tmp_path / "utf16.txt"))
    (tmp_path / "corpus.txt").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(1, 200)))
    with pytest.raises(InputDataError, match="gzip archive"):
        load_text(str(tmp_path / "corpus.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(InputDataError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    with pytest.raises(InputDataError, match="is empty"):
        load_text(str(tmp_path / "blank.txt"))


@pytest.mark.parametrize(
    "lines, match",
    [
        ([b'{"text": "a"}', b'{"text": "b"'], r"c\.jsonl:2 is not valid JSON"),
        ([b'{"text": "a"}', b"", b'["text", "b"]'], r"c\.jsonl:3 is a JSON array, not an object with a 'text' field"),
        ([b'{"text": "a"}', b"42"], r"c\.jsonl:2 is a JSON number"),
        ([b'{"text": "a"}', b'{"body": "b", "id": 3}'], r"c\.jsonl:2 has no field 'text' \(its fields: 'body', 'id'\)"),
        ([b'{"text": "a"}', b'{"text": 7}'], r"c\.jsonl:2: field 'text' is a JSON number, not a string"),
        ([b'{"text": "a"}', b'{"text": "caf\xe9"}'], r"c\.jsonl:2 is not UTF-8 \(byte 0xE9 at column 14\)"),
        ([b'{"text": "a"}', b'{"text": "\x00"}'], r"looks binary \(NUL bytes at offset 24\)"),
        ([b"", b"  "], r"is empty"),
        ([b'{"text": ""}'], r"has no text"),
    ],
)
def test_jsonl_lines_are_checked(tmp_path, lines, match):
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputDataError, match=match):
        load_text(str(tmp_path / "c.jsonl"))


def test_folders(tmp_path):
    """Empty files in a folder (an empty __init__.py) are skipped; a binary one is refused naming
    it; a folder without text is refused."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    assert load_text(str(tmp_path / "pkg")) == "def f():\n    return 1\n"
    (tmp_path / "pkg" / "z.txt").write_bytes(b"ok\x00\x01\x02")
    with pytest.raises(InputDataError, match=r"z\.txt looks binary"):
        load_text(str(tmp_path / "pkg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="has no .txt"):
        load_text(str(tmp_path / "empty"))
    (tmp_path / "empty" / "a.md").write_text("\n")
    with pytest.raises(InputDataError, match="no usable text"):
        load_text(str(tmp_path / "empty"))


def test_seqlen_and_memory_limits():
    """--seqlen beyond the config's maximum context and calibration that cannot fit in memory are
    refused with the limit / the estimate; what fits passes."""
    from qdlm_export.quantize.calibration import check_calibration_fits
    from qdlm_export.families.llada import LLADA

    config = {"d_model": 256, "max_sequence_length": 4096}
    check_calibration_fits(CalibrationConfig(nsamples=128, seqlen=4096), LLADA, config, available=1 << 40)
    limit = "maximum context of 4096 tokens \\(config.json max_sequence_length\\)"
    with pytest.raises(ConfigError, match=limit) as err:
        check_calibration_fits(CalibrationConfig(nsamples=4, seqlen=4097), LLADA, config, available=1 << 40)
    assert "--seqlen 4096" in err.value.hint
    # 2 x 1000 x 512 x 256 x 4 bytes = 1000 MiB needed; 100 MiB available fits 100 samples.
    with pytest.raises(ConfigError, match=r"needs about 1000\.0 MB .* only 100\.0 MB of RAM") as err:
        check_calibration_fits(CalibrationConfig(nsamples=1000, seqlen=512), LLADA, config, available=100 << 20)
    assert "--nsamples 100 or fewer" in err.value.hint
    check_calibration_fits(CalibrationConfig(nsamples=100, seqlen=512), LLADA, config, available=100 << 20)
