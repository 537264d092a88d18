"""quantize --config: a recipe holds the command's options; each checkpoint carries its resolved recipe,
and quantizing with it reproduces the checkpoint bit for bit (cli/recipe.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tests.cli_runner import run_cli


def tensors(folder: Path) -> dict:
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def config_without_run_details(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    provenance = config["quantization_config"]["provenance"]
    for key in ("created", "command"):  # when and how it was typed: not what was made
        provenance.pop(key)
    return config


def test_recipe_reproduces_checkpoint_bit_for_bit(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(first), "--method", "gptq", "--bits", "3",
                           "--group-size", "64", "--asymmetric", "-O", "block_size=32", "--nsamples", "6",
                           "--seqlen", "48", "--seed", "11", "--no-verify", "-q")
    assert code == 0, err
    text = (first / "qdlm_recipe.yaml").read_text()
    assert str(tmp_path) not in text and "/home" not in text  # nothing absolute in a pushed file
    recipe = yaml.safe_load(text)
    assert recipe["model"] is None and recipe["method"] == "gptq" and recipe["bits"] == 3
    assert recipe["group-size"] == 64 and recipe["symmetric"] is False and recipe["seed"] == 11
    assert "block_size=32" in recipe["option"] and recipe["compute-dtype"] == "float32"
    assert "overwrite" not in recipe and "json" not in recipe

    second = tmp_path / "second"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--config", str(first / "qdlm_recipe.yaml"),
                           "--out", str(second), "-q")
    assert code == 0, err
    a, b = tensors(first), tensors(second)
    assert sorted(a) == sorted(b) and len(a) > 10
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name]), name
    assert config_without_run_details(first) == config_without_run_details(second)
    again = yaml.safe_load((second / "qdlm_recipe.yaml").read_text())
    assert {**again, "out": "first"} == recipe


def test_flags_win_over_the_file_whose_values_are_checked(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: rtn\nbits: 2\ngroup-size: 32\nnsamples: 0\nverify: false\n")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--config", str(recipe), "--out", str(tmp_path / "a"))
    assert code == 2 and "--nsamples" in err and "0 is out of range" in err  # the file's value, checked like a flag
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--config", str(recipe), "--nsamples", "4",
                           "--group-size", "64", "--out", str(tmp_path / "a"), "-q")
    assert code == 0, err
    qconfig = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qconfig["weights"]["bits"] == 2 and qconfig["weights"]["group_size"] == 64


def test_unknown_key_refused_naming_key_and_file(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("bits: 4\nbitz: 3\n")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--config", str(recipe), "--out", str(tmp_path / "a"))
    assert code == 2 and "'bitz'" in err and "recipe.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    recipe.write_text("- bits\n")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--config", str(recipe), "--out", str(tmp_path / "a"))
    assert code == 2 and "mapping" in err
