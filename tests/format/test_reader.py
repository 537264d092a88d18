"""The one checkpoint reader (format/reader.py) and the one quantization_config schema (format/config_schema.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qdlm_export.core.schemes import WeightScheme, quantize_rtn
from qdlm_export.errors import CheckpointError
from qdlm_export.format.config_schema import (
    build_quantization_config,
    parse_quantization_config,
)
from qdlm_export.format.reader import INDEX_FILE, CheckpointReader, check_symlinks
from qdlm_export.format.spec import (
    module_config_entry,
    module_spec,
    quantized_linear_spec,
)


def _folder(tmp_path: Path, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "a.weight": torch.randn(5, 7, generator=gen, dtype=torch.float64).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=gen),
        "c.codes": torch.randint(-2**31, 2**31 - 1, (2, 4), generator=gen, dtype=torch.int32),
    }
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: tensors[k] for k in ("a.weight", "b.bias")}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"c.codes": tensors["c.codes"]}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00001-of-00002.safetensors",
                  "c.codes": "model-00002-of-00002.safetensors"}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder, tensors


def test_reader_lists_headers_and_loads_on_demand(tmp_path):
    folder, tensors = _folder(tmp_path, seed=101)
    reader = CheckpointReader.open(folder)
    try:
        assert set(reader.keys()) == set(tensors)
        assert reader.entry("a.weight").dtype == "BF16" and reader.shape("a.weight") == (5, 7)
        assert reader.entry("c.codes").dtype == "I32" and reader.entry("c.codes").file == "model-00002-of-00002.safetensors"
        for key, value in tensors.items():
            assert torch.equal(reader.get(key), value)
        with pytest.raises(CheckpointError, match="tensor missing.weight is missing"):
            reader.get("missing.weight")
    finally:
        reader.close()


def test_reader_refuses_index_entries_and_links_out_of_the_folder(tmp_path):
    folder, _ = _folder(tmp_path, seed=102)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["c.codes"] = "../elsewhere.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="a path outside the checkpoint folder"):
        CheckpointReader.open(folder)
    outside = tmp_path / "secret.txt"
    outside.write_text("token")
    (folder / "tokenizer.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link to .*outside the\ncheckpoint folder|outside the checkpoint folder"):
        check_symlinks(folder)


def _config(**weights) -> dict:
    return build_quantization_config(
        method="rtn", method_options={}, weights={"bits": 4, "group_size": 8, "symmetric": True,
                                                   "scale_dtype": "float16", **weights},
        activations=None, family="llada", mask_token_id=126336, logits_shift=False, quantized_modules=["m"],
        module_overrides={}, modules_not_converted=["lm_head"], transforms={}, calibration=None,
        provenance={"tool": "qdlm-export"},
    )


def test_built_config_parses_and_bad_fields_are_named(tmp_path):
    where = tmp_path / "config.json"
    qconfig = _config()
    assert parse_quantization_config({"quantization_config": qconfig}, where) == qconfig
    with pytest.raises(CheckpointError, match=r"quantization_config.weights.bits in .* is '4'; expected one of"):
        parse_quantization_config({"quantization_config": _config(bits="4")}, where)
    with pytest.raises(CheckpointError, match="format_version 7 is not supported"):
        parse_quantization_config({"quantization_config": {**qconfig, "format_version": 7}}, where)


@pytest.mark.parametrize("symmetric", [True, False])
def test_module_entry_gives_the_spec_of_the_full_config(symmetric):
    gen = torch.Generator().manual_seed(103 + symmetric)
    weight = torch.randn(6, 16, generator=gen, dtype=torch.float64).float()
    bias = torch.randn(6, generator=gen).to(torch.bfloat16)
    qweight = quantize_rtn(weight, WeightScheme(4, 8, symmetric), torch.float16, bias=bias)
    qweight.input_transforms = [{"op": "quantize_input"}]
    acts = {"bits": 8, "granularity": "token", "symmetric": True}
    full = {**_config(symmetric=symmetric), "activations": acts,
            "transforms": {"modules": {"m": [{"op": "quantize_input"}]}}}
    expected = module_spec(full, "m", 16, 6, True, torch.bfloat16)
    assert quantized_linear_spec("m", qweight, activations=acts) == expected
    assert module_config_entry("m", qweight, activations=acts)["weights"]["scale_dtype"] == "float16"
