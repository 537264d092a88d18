"""Calibration through `datasets`: parquet/json/csv/arrow files, save_to_disk folders and Hub ids give
the same text (and checkpoints) as the same paragraphs in a .txt file; the text column, the split, the
config and the chat template are honoured; anything else is refused naming the file. No network:
every dataset is built here, and the Hub is a monkeypatched ``datasets.load_dataset``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.errors import ConfigError, InputDataError
from qdlm_export.fixtures import tokenizer_dir
from qdlm_export.quantize.calibration import DEFAULT_CORPUS, calibration_tokens, load_text
from qdlm_export.quantize.calibration_sources import ROW_SEPARATOR
from tests.cli_runner import run_cli

SCRIPT = Path(sys.executable).parent / "qdlm-export"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """The first paragraphs of the shipped corpus, as dataset rows (a few thousand tokens)."""
    rows = DEFAULT_CORPUS.read_text(encoding="utf-8").split(ROW_SEPARATOR)[:300]
    assert len(rows) == 300 and sum(map(len, rows)) > 20_000
    return rows


@pytest.fixture(scope="module")
def sources(tmp_path_factory, paragraphs) -> dict[str, Path]:
    """The same rows as a .txt file, a parquet file (with an id column beside the text), a
    save_to_disk folder, a DatasetDict folder, json/csv files and an arrow file."""
    root = tmp_path_factory.mktemp("calib-sources")
    (root / "rows.txt").write_text(ROW_SEPARATOR.join(paragraphs), encoding="utf-8")
    data = datasets.Dataset.from_dict({"id": list(range(len(paragraphs))), "text": paragraphs})
    data.to_parquet(str(root / "rows.parquet"))
    data.to_json(str(root / "rows.json"))
    data.to_csv(str(root / "rows.csv"), index=False)
    data.save_to_disk(str(root / "saved"))
    held = datasets.Dataset.from_dict({"text": ["held out words " * 40]})
    datasets.DatasetDict({"train": data, "validation": held}).save_to_disk(str(root / "saved-dict"))
    arrow = next((root / "saved").glob("*.arrow"))
    return {"txt": root / "rows.txt", "parquet": root / "rows.parquet", "saved": root / "saved",
            "saved-dict": root / "saved-dict", "json": root / "rows.json", "csv": root / "rows.csv",
            "arrow": arrow, "root": root}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.mark.parametrize("kind", ["parquet", "saved", "saved-dict", "json", "csv", "arrow"])
def test_dataset_rows_are_the_text_file(sources, kind, tokenizer):
    """Rows are joined by a blank line, like .jsonl records: the text, and so the windows, equal the
    .txt file's (the "id" column is not text; "text" is chosen by default)."""
    text = load_text(str(sources["txt"]))
    assert load_text(str(sources[kind])) == text
    config = CalibrationConfig(source=str(sources[kind]), nsamples=6, seqlen=64, seed=5)
    expected = calibration_tokens(tokenizer, CalibrationConfig(source=str(sources["txt"]), nsamples=6, seqlen=64, seed=5))
    assert torch.equal(calibration_tokens(tokenizer, config), expected)


def test_parquet_and_saved_folder_give_the_txt_checkpoint(sources, tiny_llada, tmp_path):
    """The issue's acceptance test: GPTQ calibrated from a parquet file and from a save_to_disk
    folder writes tensor-equal weights to GPTQ calibrated from the same text in a .txt file."""
    from qdlm_export.quantize.api import make_config, quantize

    weights = {}
    for kind in ("txt", "parquet", "saved"):
        out = tmp_path / kind
        quantize(str(tiny_llada), out, make_config("gptq", bits=4, group_size=32), trust_remote_code=True,
                 verify=False, device="cpu", calibration=CalibrationConfig(source=str(sources[kind]), nsamples=8,
                                                                           seqlen=64, seed=3))
        weights[kind] = load_file(str(out / "model.safetensors"))
        record = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
        assert record["dataset"] == sources[kind].name and record["nsamples"] == 8  # no local path is published
    assert weights["txt"].keys() == weights["parquet"].keys() == weights["saved"].keys()
    packed = [k for k in weights["txt"] if k.endswith("weight_packed")]
    assert packed
    for kind in ("parquet", "saved"):
        for key, tensor in weights["txt"].items():
            assert torch.equal(weights[kind][key], tensor), (kind, key)
    # ...and calibration mattered: another corpus changes the GPTQ weights.
    other = tmp_path / "other"
    quantize(str(tiny_llada), other, make_config("gptq", bits=4, group_size=32), trust_remote_code=True, verify=False,
             device="cpu", calibration=CalibrationConfig(nsamples=8, seqlen=64, seed=3))
    moved = load_file(str(other / "model.safetensors"))
    assert any(not torch.equal(moved[k], weights["txt"][k]) for k in packed)


def test_split_and_text_column(sources, tmp_path):
    assert load_text(str(sources["saved-dict"]), split="validation") == "held out words " * 40
    with pytest.raises(ConfigError, match="no split 'test'") as err:
        load_text(str(sources["saved-dict"]), split="test")
    assert "train, validation" in err.value.hint
    with pytest.raises(ConfigError, match="single dataset"):
        load_text(str(sources["saved"]), split="validation")
    # datasets' slicing syntax on files
    rows = load_text(str(sources["parquet"]), split="train[:3]").split(ROW_SEPARATOR)
    assert rows == load_text(str(sources["txt"])).split(ROW_SEPARATOR)[:3]
    # the single string column is the default; an explicit --calib-field wins; several: listed
    data = datasets.Dataset.from_dict({"n": [1, 2], "body": ["first body", "second body"]})
    data.to_parquet(str(tmp_path / "one.parquet"))
    assert load_text(str(tmp_path / "one.parquet")) == "first body\n\nsecond body"
    data = datasets.Dataset.from_dict({"title": ["t1", "t2"], "body": ["b1", "b2"], "n": [1, 2]})
    data.to_parquet(str(tmp_path / "two.parquet"))
    assert load_text(str(tmp_path / "two.parquet"), "title") == "t1\n\nt2"
    with pytest.raises(InputDataError, match=r"two\.parquet has no 'text' column and several string columns") as err:
        load_text(str(tmp_path / "two.parquet"))
    assert "'title', 'body', 'n' (not text)" in err.value.message and "--calib-field" in err.value.hint
    with pytest.raises(InputDataError, match=r"has no column 'txt' \(its columns: 'title', 'body'"):
        load_text(str(tmp_path / "two.parquet"), "txt")
    with pytest.raises(InputDataError, match=r"two\.parquet row 0: column 'n' is number, not a string"):
        load_text(str(tmp_path / "two.parquet"), "n")
    datasets.Dataset.from_dict({"text": ["a", None]}).to_parquet(str(tmp_path / "null.parquet"))
    with pytest.raises(InputDataError, match=r"null\.parquet row 1: column 'text' is null"):
        load_text(str(tmp_path / "null.parquet"))


def test_jsonl_default_field_is_the_only_string_field(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": 1, "body": "one"}) + "\n" + json.dumps({"id": 2, "body": "two"}))
    assert load_text(str(tmp_path / "c.jsonl")) == "one\n\ntwo"


def test_hub_dataset_options_are_passed_through(monkeypatch, tiny_llada, tmp_path, capsys):
    """A Hub id goes to ``datasets.load_dataset(id, config, split=...)``; the column is chosen as for
    files; the CLI passes --calib-config/--calib-split/--calib-field through and records them."""
    calls = []
    text = "wiki words and more words " * 200

    def fake_load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_dict({"title": ["a title"] * 4, "body": [text] * 4})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = load_text("someone/wiki", "body", dataset_config="raw-v1", split="validation")
    assert got == ROW_SEPARATOR.join([text] * 4)
    assert calls == [("someone/wiki", "raw-v1", "validation", {})]

    calls.clear()
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(
        monkeypatch, capsys, "quantize", str(tiny_llada), "--out", str(out), "--trust-remote-code", "--method", "gptq",
        "--nsamples", "4", "--seqlen", "32", "--calib", "someone/wiki", "--calib-config", "raw-v1",
        "--calib-split", "validation", "--calib-field", "body", "--json",
    )
    assert rc == 0, stdout + stderr
    # calibration, then verification (other windows of the same data)
    assert calls and all(c == ("someone/wiki", "raw-v1", "validation", {}) for c in calls)
    record = json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]
    assert record["dataset"] == "someone/wiki" and record["dataset_config"] == "raw-v1"
    assert record["split"] == "validation" and record["text_field"] == "body"

    def failing(*args, **kwargs):
        raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['a', 'b']")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(ConfigError, match="someone/wiki.*Config name is missing") as err:
        load_text("someone/wiki")
    assert "--calib-config" in err.value.hint


def test_chat_template(tokenizer, tmp_path):
    """--calib-chat-template renders a messages column, or prompt/response columns, with the model's
    chat template; each rendered conversation is a row."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.chat_template = CHAT_TEMPLATE
    chats = [[{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i} " * 30}]
             for i in range(12)]
    datasets.Dataset.from_dict({"messages": chats}).to_parquet(str(tmp_path / "chat.parquet"))
    expected = ROW_SEPARATOR.join(tok.apply_chat_template(c, tokenize=False) for c in chats)
    assert "<|user|>" in expected
    config = CalibrationConfig(source=str(tmp_path / "chat.parquet"), chat_template=True, nsamples=4, seqlen=32)
    windows = calibration_tokens(tok, config)
    whole = tok(expected, add_special_tokens=False)["input_ids"]
    flat = ",".join(map(str, whole))
    for row in windows.tolist():
        assert ",".join(map(str, row)) in flat  # windows of the rendered conversations
    # alpaca-style columns: the instruction, its input, and the output
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(
        {"instruction": f"do {i}", "input": "with this" if i % 2 else "", "output": f"done {i}"}) for i in range(3)))
    render = lambda m: json.dumps(m)  # noqa: E731 (the messages, to check what the rule built)
    rows = [json.loads(r) for r in load_text(str(tmp_path / "alpaca.jsonl"), render=render).split(ROW_SEPARATOR)]
    assert rows[1] == [{"role": "user", "content": "do 1\n\nwith this"}, {"role": "assistant", "content": "done 1"}]
    assert rows[0][0] == {"role": "user", "content": "do 0"}
    # refusals: no template, plain text, no conversations
    with pytest.raises(ConfigError, match="no chat template"):
        calibration_tokens(tokenizer, config)
    with pytest.raises(ConfigError, match="plain text"):
        load_text("default", render=render)
    datasets.Dataset.from_dict({"text": ["x"]}).to_parquet(str(tmp_path / "plain.parquet"))
    with pytest.raises(InputDataError, match=r"plain\.parquet has no conversations.*'text'"):
        load_text(str(tmp_path / "plain.parquet"), render=render)
    datasets.Dataset.from_dict({"messages": [["not a message"]]}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputDataError, match=r"bad\.parquet row 0: column 'messages' is not a list of \{role, content\}"):
        load_text(str(tmp_path / "bad.parquet"), render=render)


def test_options_on_sources_they_do_not_apply_to(sources):
    with pytest.raises(ConfigError, match="--calib-config 'raw' applies to Hub datasets"):
        load_text(str(sources["parquet"]), dataset_config="raw")
    with pytest.raises(ConfigError, match="--calib-split 'test' applies to datasets"):
        load_text(str(sources["txt"]), split="test")
    for field, value, flag in (("split", " ", "--calib-split"), ("text_field", "", "--calib-field"),
                               ("dataset_config", "", "--calib-config")):
        with pytest.raises(ConfigError, match=f"{flag} is empty"):
            CalibrationConfig(**{field: value})


def test_missing_datasets_package_names_the_extra(sources, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match="`datasets` package, which is not installed") as err:
        load_text(str(sources["parquet"]))
    assert 'pip install "qdlm-export[calib]"' in err.value.hint
    assert load_text(str(sources["txt"]))  # text needs no datasets


def _parquet_bytes(tmp_path: Path) -> bytes:
    datasets.Dataset.from_dict({"text": ["words"] * 3}).to_parquet(str(tmp_path / "real.parquet"))
    return (tmp_path / "real.parquet").read_bytes()


REFUSALS = [
    # (file name, bytes maker, words in the message)
    ("corpus.txt", _parquet_bytes, ["corpus.txt", "a Parquet file"]),
    ("rows.parquet", lambda _: b"just some text\n" * 50, ["rows.parquet", "named .parquet but holds text"]),
    ("rows.arrow", lambda _: b"%PDF-1.7\n" + bytes(range(256)) * 4, ["rows.arrow", "holds a PDF document"]),
    ("rows.csv", lambda _: b"PK\x03\x04" + bytes(range(256)) * 4, ["rows.csv", "not CSV text", "zip archive"]),
    ("rows.json", lambda _: b"\x1f\x8b\x08\x00" + bytes(range(1, 256)), ["rows.json", "not JSON text", "gzip archive"]),
    ("rows.csv", lambda _: "id,text\n1,caf\u00e9\n".encode("utf-16"), ["rows.csv", "UTF-16"]),
    ("rows.parquet", lambda _: b"PAR1" + b"\x00" * 64, ["rows.parquet", "could not be read as parquet"]),
]


@pytest.mark.parametrize("name, make, words", REFUSALS, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_files_that_are_not_what_they_say_are_refused(name, make, words, tiny_llada, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / name
    path.write_bytes(make(tmp_path))
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(monkeypatch, capsys, "quantize", str(tiny_llada), "--out", str(out),
                                 "--trust-remote-code", "--method", "gptq", "--nsamples", "4", "--seqlen", "32",
                                 "--calib", str(path))
    message = " ".join(stderr.split())
    assert rc == 1, stdout + stderr
    assert "error:" in stderr and "hint:" in stderr and "Traceback" not in stderr
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert not out.exists()


def test_console_script_refuses_a_misnamed_parquet(tmp_path):
    """The installed console script, in a subprocess: a parquet file passed as .txt exits 1 naming the
    file and what it is, with the way to read it."""
    assert SCRIPT.is_file(), f"the console script is not installed at {SCRIPT}"
    (tmp_path / "corpus.txt").write_bytes(_parquet_bytes(tmp_path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([str(SCRIPT), "quantize", "--out", str(tmp_path / "out"), "--method", "gptq",
                           "--calib", str(tmp_path / "corpus.txt"), "--nsamples", "2", "--seqlen", "16"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "corpus.txt" in message and "a Parquet file" in message and "*.parquet" in message
    assert not (tmp_path / "out").exists()
