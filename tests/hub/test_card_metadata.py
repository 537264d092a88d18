"""The model card's Hub metadata, no local path in anything `push` uploads, and a copied folder's card
still recognised as generated (issue 15, item 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from qdlm_export.hub.card import is_generated_card, render_model_card, write_model_card
from tests.hub.test_hub import QUANT_CONFIG, REPORT, make_checkpoint


def test_card_metadata_parses_with_model_card(tmp_path):
    calibration = {"dataset": "Salesforce/wikitext", "nsamples": 16, "seqlen": 64}
    table = {"arc_easy/acc": {"original": 0.71, "quantized": 0.695}, "masked_token_nll": {"quantized": 2.5}}
    report = dict(REPORT, calibration=calibration, eval=table)
    folder = make_checkpoint(tmp_path / "c", quant_config=dict(QUANT_CONFIG, method="gptq"), report=report)
    text = render_model_card(folder, "me/llada-w4", license="apache-2.0")
    data = ModelCard(text).data
    assert data.license == "apache-2.0"
    assert data.base_model == "GSAI-ML/LLaDA-8B-Instruct" and data.base_model_relation == "quantized"
    assert data.datasets == ["Salesforce/wikitext"]
    assert {"qdlm", "quantized", "diffusion", "gptq", "4-bit"} <= set(data.tags)
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("arc_easy", "acc"): 0.695, ("masked_token_nll", "masked_token_nll"): 2.5}
    assert data.library_name == "transformers"
    # --base-model replaces what the source says; "" leaves it out
    assert ModelCard(render_model_card(folder, base_model="org/other")).data.base_model == "org/other"
    assert ModelCard(render_model_card(folder, base_model="")).data.base_model is None


def test_a_local_calibration_path_is_not_a_dataset_id(tmp_path):
    report = dict(REPORT, calibration={"dataset": str(tmp_path / "calib.txt"), "nsamples": 4, "seqlen": 8})
    text = render_model_card(make_checkpoint(tmp_path / "c", report=report))
    assert ModelCard(text).data.datasets is None
    assert str(tmp_path) not in text and "`calib.txt`" in text


def test_load_instructions_match_the_checkpoint(tmp_path):
    folder = make_checkpoint(tmp_path / "c")
    guarded = render_model_card(folder, "me/x")
    assert "pip install qdlm-export" in guarded and "import qdlm_export" in guarded
    (folder / "qdlm_loader.py").write_text("# Copied by qdlm-export\n")
    contained = render_model_card(folder, "me/x")
    assert "pip install qdlm-export" not in contained and "import qdlm_export" not in contained
    assert 'AutoModel.from_pretrained("me/x", trust_remote_code=True' in contained
    assert "self-contained" in contained


def _all_text(folder: Path, names) -> dict[str, str]:
    return {n: (folder / n).read_bytes().decode("utf-8", "replace") for n in names}


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory, tiny_llada):
    """A GPTQ checkpoint of a local copy of a Hub model (its card names a license and the Hub id),
    calibrated on a local text file, quantized by absolute paths."""
    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.quantize.api import make_config, quantize

    root = tmp_path_factory.mktemp("local-source")
    source = root / "models" / "tiny-llada"
    shutil.copytree(tiny_llada, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, _name_or_path="GSAI-ML/LLaDA-8B-Instruct")))
    (source / "README.md").write_text("---\nlicense: mit\ntags:\n- llada\n---\n# tiny\n")
    calib = root / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n") * 8)
    out = root / "out" / "tiny-w4"
    command = f"qdlm-export quantize {source} --method gptq --calib {calib} --out={out}"
    quantize(str(source), out, make_config("gptq", bits=4, group_size=32),
             calibration=CalibrationConfig(source=str(calib), nsamples=4, seqlen=32),
             trust_remote_code=True, verify=False, command=command)
    return root, out


def test_no_local_path_in_any_pushed_file(local_checkpoint):
    from qdlm_export.hub.push import upload_plan, validate_checkpoint

    root, out = local_checkpoint
    files, _ = upload_plan(validate_checkpoint(out))
    texts = _all_text(out, [n for n, _ in files if not n.endswith(".safetensors")])
    assert {"README.md", "config.json", "qdlm_report.json"} <= set(texts)
    home = os.path.expanduser("~")
    for name, text in texts.items():
        for needle in (str(root), str(root.resolve()), home + "/", "/tmp/"):
            assert needle not in text, (name, needle)
    qc = json.loads(texts["config.json"])["quantization_config"]
    assert qc["provenance"]["source"] == "tiny-llada" and qc["provenance"]["source_kind"] == "local"
    assert "--calib calib.txt" in qc["provenance"]["command"] and "--out=tiny-w4" in qc["provenance"]["command"]
    assert json.loads(texts["qdlm_report.json"])["source"] == "tiny-llada"
    assert json.loads(texts["qdlm_report.json"])["calibration"]["dataset"] == "calib.txt"
    data = ModelCard(texts["README.md"]).data
    assert data.license == "mit"  # from the local source's own card
    assert data.base_model == "GSAI-ML/LLaDA-8B-Instruct"  # the Hub id the local copy records
    assert "pip install qdlm-export" not in texts["README.md"]  # self-contained by default


def test_copied_folder_card_is_still_generated(local_checkpoint, tmp_path):
    from qdlm_export.eval.checkpoint_files import write_eval
    from qdlm_export.format.spec import LOCAL_SOURCE_FILE

    _, out = local_checkpoint
    assert is_generated_card(out)
    copy = tmp_path / "elsewhere" / "renamed-copy"
    shutil.copytree(out, copy)  # new name, new times; without the source record (another machine)
    (copy / LOCAL_SOURCE_FILE).unlink()
    os.utime(copy / "README.md", (0, 0))
    assert is_generated_card(copy)
    table = {"arc_easy/acc": {"original": 0.5, "quantized": 0.4}}
    assert write_eval(copy, table, {}) == "regenerated"
    card = ModelCard((copy / "README.md").read_text())
    assert card.data.license == "mit" and card.data.base_model == "GSAI-ML/LLaDA-8B-Instruct"
    assert card.data.eval_results[0].metric_value == 0.4
    assert is_generated_card(copy)
    # a hand edit is still seen as one
    (copy / "README.md").write_text((copy / "README.md").read_text() + "\nMy notes.\n")
    assert not is_generated_card(copy)
    assert write_eval(copy, table, {}) == "kept"


def test_pushed_card_keeps_its_repo_id_through_eval(tmp_path):
    from qdlm_export.eval.checkpoint_files import write_eval

    folder = make_checkpoint(tmp_path / "c")
    write_model_card(folder, "me/pushed", license="mit")  # what push leaves in the folder
    assert is_generated_card(folder)
    assert write_eval(folder, {"t/acc": {"original": 1.0, "quantized": 0.9}}, {}) == "regenerated"
    text = (folder / "README.md").read_text()
    assert 'from_pretrained("me/pushed"' in text and ModelCard(text).data.license == "mit"
