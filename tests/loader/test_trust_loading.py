"""Strict loading: a checkpoint missing a tensor its config promises, or holding one with the wrong
dtype or shape, or a truncated weight file, is refused by ``from_pretrained`` (with qdlm-export
imported, and self-contained in a process where qdlm-export cannot be imported), by ``inspect`` and
by ``eval``, each naming the tensor (or file). Nothing ever computes on uninitialised memory.

Each case corrupts a fresh copy of a checkpoint written by ``quantize()``, rewriting its safetensors
file with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qdlm_export  # noqa: F401  (registers the native loader)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.errors import CheckpointError
from qdlm_export.loader.selfcontained import is_self_contained
from qdlm_export.quantize.api import make_config, quantize
from tests.cli_runner import run_cli
from tests.isolation import BLOCKER, run_isolated

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Q = "model.transformer.blocks.0.q_proj"
K = "model.transformer.blocks.1.k_proj"
FF = "model.transformer.blocks.0.ff_out"
TOKENS = torch.randint(3, 2000, (1, 12), generator=torch.Generator().manual_seed(7))
CALIB = CalibrationConfig(nsamples=2, seqlen=32)


@pytest.fixture(scope="module")
def checkpoints(tiny_llada, tmp_path_factory) -> dict[str, Path]:
    """kind -> a checkpoint folder (self-contained, as quantize writes by default):
    ``w4``: RTN W4 g64 symmetric; ``w4-asym``: W3 asymmetric (zero points); ``duquant``: W4A4 with
    online smoothing, permutation and block rotations (transform tensors); ``static``: W8A8 with a
    static per-tensor input scale."""
    root = tmp_path_factory.mktemp("trust-loading")
    specs = {
        "w4": ("rtn", dict(bits=4, group_size=64)),
        "w4-asym": ("rtn", dict(bits=3, group_size=64, symmetric=False)),
        "duquant": ("duquant", dict(bits=4, act_bits=4, block_size=64, max_rotation_steps=4, rotation_tokens=32,
                                    fold_smoothing=False)),
        "static": ("rtn-wa", dict(bits=8, act_bits=8, act_granularity="tensor")),
    }
    out = {}
    for kind, (method, options) in specs.items():
        folder = root / kind
        quantize(str(tiny_llada), folder, make_config(method, **options), trust_remote_code=True, verify=False,
                 calibration=CALIB)
        assert is_self_contained(folder)
        out[kind] = folder
    return out


def _weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


def _rewrite(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors, metadata = _weights(folder)
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata=metadata)


def _delete(key: str):
    def edit(t):
        assert key in t, key  # the corruption really removes something the checkpoint had
        del t[key]
    return edit


def _as_float(key: str):
    def edit(t):
        assert t[key].dtype == torch.int32
        t[key] = t[key].to(torch.float32)
    return edit


def _narrow(key: str):
    def edit(t):
        t[key] = t[key][..., :-1].contiguous()
    return edit


@dataclass(frozen=True)
class Case:
    checkpoint: str
    edit: Callable | None  # on the tensors (None: `damage` acts on the file)
    needles: tuple[str, ...]  # what every refusal must name
    damage: Callable[[Path], None] | None = None


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


CASES = {
    "missing-scale": Case("w4", _delete(f"{Q}.weight_scale"), (f"{Q}.weight_scale", "missing")),
    "missing-packed": Case("w4", _delete(f"{K}.weight_packed"), (f"{K}.weight_packed", "missing")),
    "missing-shape": Case("w4", _delete(f"{FF}.weight_shape"), (f"{FF}.weight_shape", "missing")),
    "missing-zero-point": Case("w4-asym", _delete(f"{K}.weight_zero_point"), (f"{K}.weight_zero_point", "missing")),
    "codes-as-float32": Case("w4", _as_float(f"{Q}.weight_packed"), (f"{Q}.weight_packed", "dtype", "F32", "I32")),
    "scale-wrong-shape": Case("w4", _narrow(f"{K}.weight_scale"), (f"{K}.weight_scale", "shape")),
    "packed-wrong-shape": Case("w4", _narrow(f"{Q}.weight_packed"), (f"{Q}.weight_packed", "shape")),
    "missing-rotation": Case("duquant", _delete(f"{K}.input_rotation_1"), (f"{K}.input_rotation_1", "missing")),
    "missing-permutation": Case("duquant", _delete(f"{Q}.input_permutation"), (f"{Q}.input_permutation", "missing")),
    "missing-smooth": Case("duquant", _delete(f"{FF}.input_smooth"), (f"{FF}.input_smooth", "missing")),
    "missing-input-scale": Case("static", _delete(f"{Q}.input_scale"), (f"{Q}.input_scale", "missing")),
    "truncated-file": Case("w4", None, ("model.safetensors", "truncated"), damage=_truncate),
}


@pytest.fixture(scope="module")
def broken(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """case -> a fresh copy of its checkpoint with the corruption applied."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, case in CASES.items():
        folder = root / name
        shutil.copytree(checkpoints[case.checkpoint], folder)
        if case.edit is not None:
            _rewrite(folder, case.edit)
        if case.damage is not None:
            case.damage(folder)
        out[name] = folder
    return out


def _load(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)


def _assert_names(text: str, needles: tuple[str, ...]) -> None:
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"


# ----------------------------------------------------------------------------------- controls
@pytest.mark.parametrize("kind", ["w4", "w4-asym", "duquant", "static"])
def test_intact_checkpoints_load_and_compute_finite_logits(checkpoints, kind):
    model = _load(checkpoints[kind])
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------- native
@pytest.mark.parametrize("case", list(CASES))
def test_native_from_pretrained_refuses(broken, case):
    with pytest.raises(CheckpointError) as info:
        _load(broken[case])
    text = str(info.value)
    _assert_names(text, CASES[case].needles)
    assert "incomplete or corrupted" in text and "qdlm-export quantize" in text  # what to do next


def test_truncation_names_the_shard_of_a_sharded_checkpoint(checkpoints, tmp_path):
    """Shards: the files transformers hands the quantizer are all checked, each named."""
    from qdlm_export.format.writer import ShardedWriter

    folder = tmp_path / "sharded"
    shutil.copytree(checkpoints["w4"], folder)
    tensors, _ = _weights(folder)
    (folder / "model.safetensors").unlink()
    writer = ShardedWriter(folder, max_shard_bytes=200_000)
    for key, value in tensors.items():
        writer.add(key, value)
    shards = writer.close()
    assert len(shards) >= 2
    assert (folder / "model.safetensors.index.json").is_file()
    _load(folder)  # intact shards load
    victim = shards[-1]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=victim.name):
        _load(folder)


def test_loaded_buffers_are_checked_after_loading(checkpoints):
    """The check after loading (what guards a load that did not go through the files' headers, e.g. a
    ``state_dict`` passed in): a buffer transformers filled with uninitialised memory is refused."""
    from qdlm_export.loader.hf_quantizer import check_loaded_modules

    model = _load(checkpoints["w4"])
    check_loaded_modules(model, headers_checked=False)  # a clean load passes
    linear = model.get_submodule(Q)
    linear.weight_scale = torch.empty_like(linear.weight_scale)  # what transformers does for a MISSING key
    with pytest.raises(CheckpointError, match=f"{Q}.weight_scale"):
        check_loaded_modules(model, headers_checked=False)


# ----------------------------------------------------------------------------------- self-contained
SC_REFUSALS = BLOCKER + """
import json, sys, torch
from transformers import AutoModel

jobs = json.loads(sys.argv[1])
results = {}
for name, folder in jobs.items():
    try:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    except Exception as exc:  # the copy's CheckpointError (qdlm_errors.py), not qdlm_export's
        results[name] = {"type": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)}
    else:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(%s)).logits
        results[name] = {"loaded": True, "finite": bool(torch.isfinite(logits).all())}
leaked = sorted(k for k in sys.modules if k.startswith("qdlm_export"))
assert not leaked, leaked
print("RESULTS " + json.dumps(results))
print("isolated-ok")
""" % (TOKENS.tolist(),)


def test_self_contained_loading_refuses_without_qdlm_export(broken, checkpoints, tmp_path):
    jobs = {name: str(folder) for name, folder in broken.items()}
    jobs["intact"] = str(checkpoints["w4"])
    stdout = run_isolated(SC_REFUSALS, [json.dumps(jobs)], tmp_path)
    results = json.loads(stdout.split("RESULTS ", 1)[1].splitlines()[0])
    assert results["intact"] == {"loaded": True, "finite": True}
    for name, case in CASES.items():
        got = results[name]
        assert got.get("type") == "CheckpointError", (name, got)
        assert got["module"].endswith(".qdlm_errors")  # raised by the checkpoint's own copy of the loader
        _assert_names(got["message"], case.needles)


# ----------------------------------------------------------------------------------- CLI
def _clean_failure(code: int, err: str, needles: tuple[str, ...]) -> None:
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err
    _assert_names(err, needles)


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_refuses(monkeypatch, capsys, broken, case):
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(broken[case]))
    _clean_failure(code, err, CASES[case].needles)
    assert "validation" not in out


@pytest.mark.parametrize("case", ["missing-scale", "codes-as-float32", "missing-rotation", "truncated-file"])
def test_eval_refuses_before_computing(monkeypatch, capsys, broken, case):
    import qdlm_export.eval.evaluate as evaluate

    def never(*args, **kwargs):
        raise AssertionError("eval loaded a model from an invalid checkpoint")

    monkeypatch.setattr(evaluate, "evaluate_model", never)
    folder = broken[case]
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(folder), "--trust-remote-code", "--limit", "2", "--no-nll")
    _clean_failure(code, err, CASES[case].needles)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # no report, no card


# ----------------------------------------------------------------------------------- full-precision tensors
# A tensor the quantizer does not own (embedding, norm, LM head) missing from the checkpoint: the
# headers of quantized modules are all right, but transformers would fill the tensor with freshly
# initialised (random) values and only log "MISSING". Refused by inspect (and so by push and eval,
# before any model code) from the manifest of written tensors in qdlm_report.json; and, for a folder
# without that manifest, after loading, naming the tensor, by the package loader, by the checkpoint's
# own copy, and by eval.
FULL_PRECISION = {
    "missing-embedding": "model.transformer.wte.weight",
    "missing-norm": "model.transformer.blocks.1.ff_norm.weight",
}


@pytest.fixture(scope="module")
def missing_full_precision(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("missing-fp")
    out = {}
    for name, key in FULL_PRECISION.items():
        folder = root / name
        shutil.copytree(checkpoints["w4"], folder)
        _rewrite(folder, _delete(key))
        out[name] = folder
    return out


@pytest.mark.parametrize("case", list(FULL_PRECISION))
def test_missing_full_precision_tensor_is_refused(missing_full_precision, case):
    with pytest.raises(CheckpointError) as info:
        _load(missing_full_precision[case])
    _assert_names(str(info.value), (FULL_PRECISION[case], "missing", "random", "qdlm-export quantize"))


def test_missing_full_precision_tensor_is_refused_without_qdlm_export(missing_full_precision, checkpoints, tmp_path):
    jobs = {name: str(folder) for name, folder in missing_full_precision.items()}
    jobs["intact"] = str(checkpoints["w4"])
    stdout = run_isolated(SC_REFUSALS, [json.dumps(jobs)], tmp_path)
    results = json.loads(stdout.split("RESULTS ", 1)[1].splitlines()[0])
    assert results["intact"] == {"loaded": True, "finite": True}
    for name, key in FULL_PRECISION.items():
        got = results[name]
        assert got.get("type") == "CheckpointError" and got["module"].endswith(".qdlm_errors"), (name, got)
        _assert_names(got["message"], (key, "missing"))


def test_the_manifest_lists_every_tensor_of_a_fresh_checkpoint(checkpoints):
    """The manifest against the weight file read back by safetensors: every tensor, its dtype and shape
    (embedding and norms included), and nothing else."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
             torch.int64: "I64", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}
    for kind, folder in checkpoints.items():
        manifest = json.loads((folder / "qdlm_report.json").read_text())["tensors"]
        tensors, _ = _weights(folder)
        assert manifest == {k: {"dtype": names[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()}, kind
        assert set(FULL_PRECISION.values()) <= set(manifest)


@pytest.mark.parametrize("case", list(FULL_PRECISION))
def test_inspect_refuses_a_checkpoint_missing_a_full_precision_tensor(monkeypatch, capsys, missing_full_precision,
                                                                      case):
    """Headers only, no model code: the tensor is missing from model.safetensors by the manifest."""
    folder = missing_full_precision[case]
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(folder))
    _clean_failure(code, err, (FULL_PRECISION[case], "missing", "model.safetensors", "qdlm_report.json",
                               "incomplete or corrupted"))
    assert "validation" not in out
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("edit,needles", [
    (lambda t: t.__setitem__("model.transformer.wte.weight", t["model.transformer.wte.weight"].half()),
     ("model.transformer.wte.weight", "dtype F16", "expected F32")),
    (lambda t: t.__setitem__("model.transformer.ln_f.weight", t["model.transformer.ln_f.weight"][:-1].clone()),
     ("model.transformer.ln_f.weight", "shape", "expected")),
], ids=["embedding-as-float16", "norm-narrowed"])
def test_inspect_refuses_a_full_precision_tensor_changed_since_writing(monkeypatch, capsys, checkpoints, tmp_path,
                                                                        edit, needles):
    folder = tmp_path / "changed"
    shutil.copytree(checkpoints["w4"], folder)
    _rewrite(folder, edit)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(folder))
    _clean_failure(code, err, (*needles, "model.safetensors"))


def test_a_folder_without_manifest_keeps_the_old_checks(monkeypatch, capsys, checkpoints, missing_full_precision,
                                                         tmp_path):
    """Written before the manifest existed: inspect checks what quantization_config promises (an
    intact folder passes; a missing full-precision tensor is left to loading, which refuses it)."""
    for name, source in (("intact", checkpoints["w4"]), ("no-embedding", missing_full_precision["missing-embedding"])):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        report = json.loads((folder / "qdlm_report.json").read_text())
        del report["tensors"]
        (folder / "qdlm_report.json").write_text(json.dumps(report))
        code, out, err = run_cli(monkeypatch, capsys, "inspect", str(folder))
        assert code == 0, err
    with pytest.raises(CheckpointError, match="model.transformer.wte.weight"):
        _load(tmp_path / "no-embedding")


def test_a_malformed_manifest_is_refused(monkeypatch, capsys, checkpoints, tmp_path):
    folder = tmp_path / "malformed"
    shutil.copytree(checkpoints["w4"], folder)
    report = json.loads((folder / "qdlm_report.json").read_text())
    report["tensors"]["model.transformer.wte.weight"] = {"dtype": "F32", "shape": "big"}
    (folder / "qdlm_report.json").write_text(json.dumps(report))
    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(folder))
    _clean_failure(code, err, ("qdlm_report.json", "tensors", "model.transformer.wte.weight"))


def test_eval_refuses_a_checkpoint_missing_a_full_precision_tensor(monkeypatch, capsys, missing_full_precision):
    """eval validates first (the manifest names the tensor): it fails before any model code, not as a
    model-code incompatibility, and writes nothing (no report, no card)."""
    folder = missing_full_precision["missing-embedding"]
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(folder), "--trust-remote-code", "--limit", "1",
                             "--mc-num", "1", "--no-nll")
    _clean_failure(code, err, (FULL_PRECISION["missing-embedding"], "missing", "incomplete or corrupted"))
    assert "remote code" not in err and "incompatibility" not in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("key,value", [("bits", "4"), ("bits", 5), ("bits", True), ("group_size", 0),
                                       ("group_size", "128"), ("symmetric", "yes")])
def test_a_mistyped_weight_scheme_is_refused_by_inspect_eval_and_bench(monkeypatch, capsys, checkpoints, tmp_path,
                                                                       key, value):
    """quantization_config.weights fields of the wrong type or range are refused naming the field,
    before anything computes on them (a string "4" used to pass inspect and fail later in convert)."""
    folder = tmp_path / "mistyped"
    shutil.copytree(checkpoints["w4"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weights"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    for args in (["inspect", str(folder)], ["eval", str(folder), "--trust-remote-code", "--no-nll"],
                 ["bench", str(folder), "--trust-remote-code", "--no-kernels"]):
        code, out, err = run_cli(monkeypatch, capsys, *args)
        _clean_failure(code, err, (f"weights.{key}", "config.json"))
