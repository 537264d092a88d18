"""``quantize(..., output_format=...)`` converts each linear from memory as it is quantized.

The reference is the other path, which reads a written checkpoint back: ``convert()`` of a native
checkpoint quantized with the same options (RTN is deterministic). Every tensor must be identical
(name, dtype, values), and config and report equal apart from what legitimately differs (timings,
the export's own size). Without verification no native weights may be written at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qdlm_export  # noqa: F401  (registers the native loader in this process)
from qdlm_export.errors import ConfigError
from qdlm_export.exports.convert import convert
from qdlm_export.format.spec import LOCAL_SOURCE_FILE
from qdlm_export.format.writer import ShardedWriter
from qdlm_export.quantize.api import make_config, quantize
from tests.reference import load_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# format -> schemes it can hold (method, options); float16 scales, what GPTQ/AWQ store
CASES = [
    ("gptq", "rtn", dict(bits=4, group_size=128, symmetric=True)),
    ("gptq", "rtn", dict(bits=3, group_size=128, symmetric=False)),
    ("awq", "rtn", dict(bits=4, group_size=64, symmetric=False)),
    ("compressed-tensors", "rtn", dict(bits=4, group_size=96, symmetric=True, group_fallback="per-channel")),
    ("compressed-tensors", "rtn", dict(bits=4, group_size=64, symmetric=False)),
    ("compressed-tensors", "rtn-wa", dict(bits=8, group_size=-1)),
]
# Report fields that differ between two runs or between the two paths (the export's own size).
RUN_FIELDS = ("elapsed_s", "seconds_per_block", "checkpoint_bytes")


def _normalised_report(folder: Path) -> dict:
    report = json.loads((folder / "qdlm_report.json").read_text())
    for key in RUN_FIELDS:
        report.pop(key, None)
    native = report["export"]["native_quantization_config"]
    native["provenance"].pop("created")
    # A native *folder* of a dense family is wrapped (its own model type, docs/EXPORTS.md); the
    # conversion's scratch copy never is, so its config lacks the record of the wrapped-away type.
    for key in [k for k in native if k.startswith("base_")]:
        native.pop(key)
    return report


def _folder_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("fmt,method,options", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_export_equals_convert_of_native(qwen, tmp_path, fmt, method, options):
    config = make_config(method, scale_dtype="float16", **options)
    quantize(str(qwen), tmp_path / "native", config, verify=False, command="same")
    expected = convert(tmp_path / "native", tmp_path / "converted", fmt)
    got = quantize(str(qwen), tmp_path / "direct", config, verify=False, output_format=fmt, command="same").out

    reference, tensors = load_tensors(expected), load_tensors(got)
    assert sorted(tensors) == sorted(reference)
    for name, tensor in reference.items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name

    config_expected = json.loads((expected / "config.json").read_text())
    config_got = json.loads((got / "config.json").read_text())
    assert config_got == config_expected
    assert _normalised_report(got) == _normalised_report(expected)
    report = json.loads((got / "qdlm_report.json").read_text())
    assert report["checkpoint_bytes"] == sum(f.stat().st_size for f in got.glob("*.safetensors"))
    # quantize records where a local source lies (for `eval`); convert has no source model to record
    assert _folder_files(got) == _folder_files(expected) | {LOCAL_SOURCE_FILE}
    assert not [p for p in got.iterdir() if p.name.startswith(".native-")]


@pytest.fixture
def writer_folders(monkeypatch) -> list[Path]:
    """The folder of every ShardedWriter created (the native writer and the export's own)."""
    folders: list[Path] = []
    init = ShardedWriter.__init__

    def spy(self, folder, *args, **kwargs):
        folders.append(Path(folder))
        init(self, folder, *args, **kwargs)

    monkeypatch.setattr(ShardedWriter, "__init__", spy)
    return folders


def test_without_verification_no_native_weights_are_written(qwen, tmp_path, writer_folders, monkeypatch):
    added_linears: list[str] = []
    add_linear = ShardedWriter.add_linear
    monkeypatch.setattr(ShardedWriter, "add_linear",
                        lambda self, name, qweight: (added_linears.append(name), add_linear(self, name, qweight)))
    config = make_config("rtn", bits=4, group_size=128, scale_dtype="float16")
    out = quantize(str(qwen), tmp_path / "gptq", config, verify=False, output_format="gptq").out
    assert len(writer_folders) == 1 and not writer_folders[0].name.startswith(".native-")  # the export's
    assert added_linears == []  # no linear went through the native writer
    assert "model.layers.0.self_attn.q_proj.qweight" in load_tensors(out)


def test_verification_reloads_a_native_scratch_copy(qwen, tmp_path, writer_folders):
    config = make_config("rtn", bits=4, group_size=128, scale_dtype="float16")
    summary = quantize(str(qwen), tmp_path / "gptq", config, verify=True, output_format="gptq")
    natives = [f for f in writer_folders if f.name.startswith(".native-")]
    assert len(natives) == 1 and not natives[0].exists()  # written for verification, then deleted
    assert summary.relative_output_error is not None and 0 < summary.relative_output_error < 0.5
    report = json.loads((summary.out / "qdlm_report.json").read_text())
    assert report["relative_output_error"] == summary.relative_output_error
    assert not [p for p in summary.out.iterdir() if p.name.startswith(".native-")]


def test_shape_refusals_come_before_quantizing(qwen, tmp_path, monkeypatch):
    """AWQ packs 8 output columns per int32: a layer of 260 outputs is refused from the headers,
    with convert's message, before any block is quantized."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    odd = tmp_path / "odd-qwen"
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=256, intermediate_size=260, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                                 tie_word_embeddings=False)).save_pretrained(odd)
    for f in qwen.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith((".txt", ".model")) or f.name == "vocab.json":
            shutil.copy(f, odd / f.name)
    import qdlm_export.quantize.api as api

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline ran before the refusal")

    monkeypatch.setattr(api, "run_pipeline", no_pipeline)
    config = make_config("rtn", bits=4, group_size=-1, scale_dtype="float16")
    with pytest.raises(ConfigError, match=r"up_proj: out_features 260 is not a multiple of 8"):
        quantize(str(odd), tmp_path / "awq", config, verify=False, output_format="awq")
    assert not (tmp_path / "awq").exists()
