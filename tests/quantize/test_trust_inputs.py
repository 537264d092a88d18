"""Bad input data checked at the door (issue 10, items 2 and 7): damaged source weights and files,
configs that do not match the weights, index files and symlinks that leave the model folder,
calibration files that are not text, limits of --seqlen/--nsamples, and the Python API's types.

Every case builds its bad input fresh (a copy of the tiny LLaDA/Dream fixture, then damaged), runs
the real ``qdlm-export`` entry point in process, and asserts: the exit code, no "internal error" and
no traceback, the key words of the message (the file, tensor, line or value named) and a hint, that
``--out`` was not created and nothing else appeared beside it, and that the source was not touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qdlm_export.errors import ArgumentTypeError, ConfigError, QdlmError
from tests.cli_runner import run_cli

LLADA_BLOCKS = "model.transformer.blocks"
WEIGHTS = "model.safetensors"


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_bytes(n: int, seed: int) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=_rng(seed), dtype=torch.uint8).tolist())


def _header_shape(folder: Path, key: str) -> list[int]:
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        return list(f.get_slice(key).get_shape())


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _poison(folder: Path, key: str, value: float, seed: int) -> tuple[int, ...]:
    """Put ``value`` (NaN or Inf) at a random position of tensor ``key``; returns the position."""
    tensors = load_file(str(folder / WEIGHTS))
    t = tensors[key]
    flat = int(torch.randint(0, t.numel(), (1,), generator=_rng(seed)))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))
    t[where] = value
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return where


def _write_index(folder: Path, entry: str) -> str:
    """An index mapping every tensor to model.safetensors except one, mapped to ``entry``."""
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        keys = list(f.keys())
    weight_map = {k: WEIGHTS for k in keys}
    weight_map[keys[-1]] = entry
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return keys[-1]


# --- cases: each takes (model folder copy, scratch folder) and returns (extra CLI args, key words) ---

RTN = ["--method", "rtn", "--no-verify"]
GPTQ = ["--method", "gptq", "--nsamples", "4", "--seqlen", "64", "--no-verify"]


def nan_in_block(model, scratch):
    key = f"{LLADA_BLOCKS}.1.up_proj.weight"
    where = _poison(model, key, float("nan"), seed=11)
    return RTN, [key, WEIGHTS, "1 NaN", str(list(where)), "--allow-non-finite"]


def inf_in_embeddings(model, scratch):
    key = "model.transformer.wte.weight"
    _poison(model, key, float("-inf"), seed=12)
    return RTN, [key, WEIGHTS, "1 Inf", "--allow-non-finite"]


def nan_in_calibrated_block(model, scratch):
    key = f"{LLADA_BLOCKS}.0.q_proj.weight"
    _poison(model, key, float("nan"), seed=13)
    return GPTQ, [key, "NaN"]


def empty_safetensors(model, scratch):
    (model / WEIGHTS).write_bytes(b"")
    return RTN, [str(model / WEIGHTS), "not a valid safetensors file", "empty", "re-download"]


def truncated_safetensors(model, scratch):
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(data[: len(data) * 2 // 3])
    return RTN, [str(model / WEIGHTS), "not a valid safetensors file (truncated?)", "re-download"]


def garbage_header(model, scratch):
    (model / WEIGHTS).write_bytes(_random_bytes(4096, seed=14))
    return RTN, [str(model / WEIGHTS), "not a valid safetensors file"]


def header_length_beyond_file(model, scratch):
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    return RTN, [str(model / WEIGHTS), "not a valid safetensors file"]


def config_is_a_list(model, scratch):
    (model / "config.json").write_text(json.dumps([{"model_type": "llada"}]))
    return RTN, [str(model / "config.json"), "JSON array", "not an object"]


def config_is_a_number(model, scratch):
    (model / "config.json").write_text("42\n")
    return RTN, [str(model / "config.json"), "JSON number"]


def config_not_utf8(model, scratch):
    text = (model / "config.json").read_text()
    data = text.replace('"activation_type"', '"activation_typ\u00e9"').encode("latin-1")
    (model / "config.json").write_bytes(data)
    return RTN, [str(model / "config.json"), "not UTF-8", f"0xE9 at offset {data.index(0xE9)}"]


def fewer_layers_in_config(model, scratch):
    _edit_config(model, n_layers=1)
    return RTN, ["config.json", "n_layers=1", "2 blocks", f"{LLADA_BLOCKS}.1"]


def more_layers_in_config(model, scratch):
    _edit_config(model, n_layers=3)
    return RTN, ["config.json", "n_layers=3", "2 blocks"]


def hidden_size_mismatch(model, scratch):
    shape = _header_shape(model, "model.transformer.wte.weight")
    _edit_config(model, d_model=shape[1] * 2)
    return RTN, [f"d_model={shape[1] * 2}", "model.transformer.wte.weight", str(shape)]


def mlp_size_mismatch(model, scratch):
    shape = _header_shape(model, f"{LLADA_BLOCKS}.0.ff_proj.weight")
    _edit_config(model, mlp_hidden_size=shape[0] + 64)
    return RTN, [f"mlp_hidden_size={shape[0] + 64}", f"{LLADA_BLOCKS}.0.ff_proj.weight", str(shape)]


def layers_not_an_int(model, scratch):
    _edit_config(model, n_layers="two")
    return RTN, ["n_layers='two'", "not a positive integer"]


def index_entry_parent(model, scratch):
    key = _write_index(model, "../" + WEIGHTS)
    return RTN, ["model.safetensors.index.json", key, "../model.safetensors", "outside the model folder"]


def index_entry_absolute(model, scratch):
    shutil.copyfile(model / WEIGHTS, scratch / "elsewhere.safetensors")
    key = _write_index(model, str(scratch / "elsewhere.safetensors"))
    return RTN, ["model.safetensors.index.json", key, "outside the model folder"]


def index_entry_missing_file(model, scratch):
    key = _write_index(model, "model-00002-of-00002.safetensors")
    return RTN, [key, "model-00002-of-00002.safetensors", "does not exist"]


def symlink_out_of_folder(model, scratch):
    shutil.move(str(model / WEIGHTS), str(scratch / "elsewhere.safetensors"))
    (model / WEIGHTS).symlink_to(scratch / "elsewhere.safetensors")
    return RTN, [WEIGHTS, "outside the model folder", "not read"]


def calib_binary(model, scratch):
    data = bytearray(b"ordinary words " * 40)
    offset = int(torch.randint(50, 500, (1,), generator=_rng(15)))
    data[offset : offset + 4] = b"\x00\x01\x00\xff"
    (scratch / "calib.txt").write_bytes(bytes(data))
    return GPTQ + ["--calib", str(scratch / "calib.txt")], [
        "calib.txt", "looks binary", f"NUL bytes at offset {offset}"]


def calib_random_bytes(model, scratch):
    (scratch / "calib.txt").write_bytes(b"\x00" + _random_bytes(3000, seed=16))
    return GPTQ + ["--calib", str(scratch / "calib.txt")], ["calib.txt", "looks binary", "offset 0"]


def calib_latin1(model, scratch):
    text = "Le caf\u00e9 est tr\u00e8s chaud, dit la fen\u00eatre. " * 200
    data = text.encode("latin-1")
    (scratch / "calib.txt").write_bytes(data)
    return GPTQ + ["--calib", str(scratch / "calib.txt")], [
        "calib.txt", "not UTF-8", f"byte 0xE9 at offset {data.index(0xE9)}", "iconv"]


def calib_gzip(model, scratch):
    import gzip

    (scratch / "corpus.txt").write_bytes(gzip.compress(b"some text " * 500))
    return GPTQ + ["--calib", str(scratch / "corpus.txt")], ["corpus.txt", "gzip archive"]


def calib_empty_file(model, scratch):
    (scratch / "calib.txt").write_bytes(b"")
    return GPTQ + ["--calib", str(scratch / "calib.txt")], ["calib.txt", "is empty"]


def jsonl_invalid_line(model, scratch):
    lines = [json.dumps({"text": f"record {i} " * 30}) for i in range(5)]
    lines[2] = lines[2][:-3]
    (scratch / "c.jsonl").write_text("\n".join(lines) + "\n")
    return GPTQ + ["--calib", str(scratch / "c.jsonl")], ["c.jsonl:3", "not valid JSON"]


def jsonl_not_an_object(model, scratch):
    lines = [json.dumps({"text": "words " * 30}), "", json.dumps(["text", "words"])]
    (scratch / "c.jsonl").write_text("\n".join(lines) + "\n")
    return GPTQ + ["--calib", str(scratch / "c.jsonl")], ["c.jsonl:3", "JSON array", "'text'"]


def jsonl_missing_field(model, scratch):
    (scratch / "c.jsonl").write_text(json.dumps({"text": "words " * 30}) + "\n")
    return GPTQ + ["--calib", str(scratch / "c.jsonl"), "--calib-field", "body"], [
        "c.jsonl:1", "no field 'body'", "'text'", "--calib-field"]


def jsonl_line_not_utf8(model, scratch):
    good = json.dumps({"text": "words " * 30}).encode()
    bad = '{"text": "na\u00efve"}'.encode("latin-1")
    (scratch / "c.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    return GPTQ + ["--calib", str(scratch / "c.jsonl")], ["c.jsonl:2", "not UTF-8", "0xEF"]


def calib_empty_folder(model, scratch):
    (scratch / "texts").mkdir()
    return GPTQ + ["--calib", str(scratch / "texts")], ["texts", "has no .txt"]


def calib_folder_without_text(model, scratch):
    (scratch / "texts").mkdir()
    (scratch / "texts" / "a.txt").write_text("")
    (scratch / "texts" / "b.md").write_text("\n\n")
    return GPTQ + ["--calib", str(scratch / "texts")], ["texts", "no usable text"]


def seqlen_beyond_context(model, scratch):
    _edit_config(model, max_sequence_length=128)
    return ["--method", "gptq", "--nsamples", "4", "--seqlen", "129", "--no-verify"], [
        "--seqlen 129", "maximum context of 128 tokens", "max_sequence_length", "--seqlen 128"]


def nsamples_beyond_memory(model, scratch):
    return ["--method", "gptq", "--nsamples", str(10**12), "--seqlen", "64", "--no-verify"], [
        f"--nsamples {10**12}", "needs about", "available", "--nsamples"]


CASES = [
    (nan_in_block, 1), (inf_in_embeddings, 1), (nan_in_calibrated_block, 1),
    (empty_safetensors, 1), (truncated_safetensors, 1), (garbage_header, 1), (header_length_beyond_file, 1),
    (config_is_a_list, 1), (config_is_a_number, 1), (config_not_utf8, 1),
    (fewer_layers_in_config, 1), (more_layers_in_config, 1), (hidden_size_mismatch, 1), (mlp_size_mismatch, 1),
    (layers_not_an_int, 1),
    (index_entry_parent, 1), (index_entry_absolute, 1), (index_entry_missing_file, 1), (symlink_out_of_folder, 1),
    (calib_binary, 1), (calib_random_bytes, 1), (calib_latin1, 1), (calib_gzip, 1), (calib_empty_file, 1),
    (jsonl_invalid_line, 1), (jsonl_not_an_object, 1), (jsonl_missing_field, 1), (jsonl_line_not_utf8, 1),
    (calib_empty_folder, 1), (calib_folder_without_text, 1),
    (seqlen_beyond_context, 2), (nsamples_beyond_memory, 2),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: file content hashes, link targets, folders."""
    state = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            state[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


@pytest.mark.parametrize("case, code", CASES, ids=[c.__name__ for c, _ in CASES])
def test_bad_input_is_refused_at_the_door(case, code, tiny_llada, tmp_path, monkeypatch, capsys):
    model, scratch, work = tmp_path / "model", tmp_path / "scratch", tmp_path / "work"
    shutil.copytree(tiny_llada, model)
    scratch.mkdir()
    work.mkdir()
    args, words = case(model, scratch)
    before = _snapshot(tmp_path)
    out = work / "out"

    rc, stdout, stderr = run_cli(monkeypatch, capsys, "quantize", str(model), "--out", str(out),
                                 "--trust-remote-code", *args)
    text = stdout + stderr
    assert rc == code, text
    assert "internal error" not in text and "Traceback" not in text, text
    assert "error:" in stderr and "hint:" in stderr, text
    message = " ".join(stderr.split())  # rich may break long lines
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert not out.exists()
    assert list(work.iterdir()) == [], "something was written beside --out"
    assert _snapshot(tmp_path) == before, "the source or the scratch inputs were changed"


def test_dream_config_mismatch_is_named(tiny_dream, tmp_path, monkeypatch, capsys):
    """The same checks read the Dream (Qwen2-layout) config keys."""
    model, work = tmp_path / "model", tmp_path / "work"
    shutil.copytree(tiny_dream, model)
    work.mkdir()
    shape = _header_shape(model, "model.layers.0.mlp.gate_proj.weight")
    _edit_config(model, intermediate_size=shape[0] * 2)
    rc, _, stderr = run_cli(monkeypatch, capsys, "quantize", str(model), "--out", str(work / "out"),
                            "--trust-remote-code", *RTN)
    message = " ".join(stderr.split())
    assert rc == 1 and f"intermediate_size={shape[0] * 2}" in message and "mlp.gate_proj.weight" in message
    assert list(work.iterdir()) == []
    _edit_config(model, intermediate_size=shape[0], num_hidden_layers=1)
    rc, _, stderr = run_cli(monkeypatch, capsys, "quantize", str(model), "--out", str(work / "out"),
                            "--trust-remote-code", *RTN)
    assert rc == 1 and "num_hidden_layers=1" in " ".join(stderr.split()) and list(work.iterdir()) == []


def test_allow_non_finite_quantizes_anyway(tiny_llada, tmp_path, monkeypatch, capsys):
    """The opt-in: the NaN is carried into the checkpoint, and only where it was."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llada, model)
    key = f"{LLADA_BLOCKS}.1.attn_norm.weight"  # not quantized: written as is
    where = _poison(model, key, float("nan"), seed=17)
    out = tmp_path / "out"
    rc, _, stderr = run_cli(monkeypatch, capsys, "quantize", str(model), "--out", str(out), "--trust-remote-code",
                            "--allow-non-finite", *RTN)
    assert rc == 0, stderr
    written = load_file(str(out / WEIGHTS))[key]
    assert torch.isnan(written[where]) and torch.isnan(written).sum() == 1


def test_index_selects_the_weights(tiny_llada, tmp_path, monkeypatch, capsys):
    """With an index, exactly the files it lists are read: a stray extra .safetensors (another
    save's consolidated file) beside them no longer joins the model."""
    from qdlm_export.quantize.source import SourceModel

    model = tmp_path / "model"
    shutil.copytree(tiny_llada, model)
    _write_index(model, WEIGHTS)
    save_file({"stray.weight": torch.randn(4, 4, generator=_rng(18))}, str(model / "consolidated.safetensors"))
    source = SourceModel.open(str(model), trust_remote_code=True)
    try:
        assert "stray.weight" not in source.keys()
        assert set(source.keys()) == set(json.loads((model / "model.safetensors.index.json").read_text())["weight_map"])
    finally:
        source.close()
    # Without an index, a tensor stored in two files is ambiguous and refused naming both files.
    (model / "model.safetensors.index.json").unlink()
    shutil.copyfile(model / WEIGHTS, model / "model-copy.safetensors")
    with pytest.raises(QdlmError, match="stored twice, in model-copy.safetensors and model.safetensors"):
        SourceModel.open(str(model), trust_remote_code=True)


def test_hub_cache_links_are_followed_only_into_their_blobs(tiny_llada, tmp_path):
    """A Hub download is a snapshot folder of links into ../../blobs: those are read; a link from
    the same snapshot to anywhere else is refused."""
    from qdlm_export.errors import InputDataError
    from qdlm_export.quantize.source import SourceModel

    repo = tmp_path / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(tiny_llada.iterdir()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    source = SourceModel.open(str(snapshot), trust_remote_code=True)
    try:
        key = f"{LLADA_BLOCKS}.0.q_proj.weight"
        assert torch.equal(source.tensor(key), load_file(str(tiny_llada / WEIGHTS))[key])
    finally:
        source.close()
    (tmp_path / "outside.safetensors").write_bytes((blobs / (snapshot / WEIGHTS).resolve().name).read_bytes())
    (snapshot / WEIGHTS).unlink()
    (snapshot / WEIGHTS).symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(InputDataError, match="outside the model folder"):
        SourceModel.open(str(snapshot), trust_remote_code=True)


# --- the Python API checks its argument types ---------------------------------------------------

API_CASES = [
    ("overwrite", "no", "a bool"),
    ("verify", 1, "a bool"),
    ("trust_remote_code", "yes", "a bool"),
    ("allow_non_finite", None, "a bool"),
    ("batch_size", 2.5, "an int"),
    ("batch_size", True, "an int"),
    ("max_shard_bytes", "5GB", "an int"),
    ("device", 0, "a str"),
    ("compute_dtype", torch.float32, "a str or None"),
    ("calibration", {"nsamples": 4}, "a CalibrationConfig"),
    ("on_block", "print", "a callable"),
    ("model", 123, "os.PathLike"),
    ("out", None, "os.PathLike"),
    ("config", "rtn", "a method config instance"),
]


@pytest.mark.parametrize("name, value, accepted", API_CASES, ids=[f"{n}={v!r}" for n, v, _ in API_CASES])
def test_python_api_checks_argument_types(name, value, accepted, tiny_llada, tmp_path):
    from qdlm_export.quantize.api import make_config, quantize

    args = {"model": str(tiny_llada), "out": tmp_path / "out", "config": make_config("rtn"),
            "trust_remote_code": True, "verify": False}
    args[name] = value
    with pytest.raises(ArgumentTypeError) as err:
        quantize(**args)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ConfigError)
    assert f"argument {name}=" in err.value.message and accepted in err.value.message and err.value.hint
    assert list(tmp_path.iterdir()) == []


def test_python_api_accepts_pathlike(tiny_llada, tmp_path):
    from qdlm_export.quantize.api import make_config, quantize

    summary = quantize(Path(tiny_llada), tmp_path / "out", make_config("rtn"), trust_remote_code=True, verify=False)
    assert summary.out == (tmp_path / "out").resolve() and (tmp_path / "out" / WEIGHTS).is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_anywhere(dtype, bad):
    """One reduction (min and max) must see a single NaN or Inf wherever it sits, in every float dtype."""
    from qdlm_export.errors import InputDataError
    from qdlm_export.quantize.source import check_finite

    value = torch.randn(333, 517).to(dtype)
    check_finite(value, "w", Path("model.safetensors"))  # finite: no error
    for _ in range(4):
        spoiled = value.clone()
        where = [int(torch.randint(0, n, ())) for n in value.shape]
        spoiled[where[0], where[1]] = bad
        with pytest.raises(InputDataError, match=rf"\[{where[0]}, {where[1]}\]"):
            check_finite(spoiled, "w", Path("model.safetensors"))
