"""Usage errors, option values checked at the door, the error boundary of ``main()``, and
``--trust-remote-code`` for every command that loads a checkpoint (issue 10, items 1, 2, 6, 7).

Each kind of usage error runs once through the REAL installed console script in a subprocess, as a
user's shell runs it (the in-process runner once hid that Typer's bundled click exceptions escaped
``main()``); the other values of each kind run in process through the same ``main()``. Every case
asserts the exit code, no traceback and no "internal error", the key words of the message, and that
a quantize ``--out`` was not created.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli_runner import run_cli

SCRIPT = Path(sys.executable).parent / "qdlm-export"
EMBEDDED = Path(__file__).resolve().parents[2] / "qdlm_export" / "assets" / "tiny-llada"


def assert_clean(code: int, err: str, expected_code: int, needles: list[str]) -> None:
    assert code == expected_code, f"exit {code}, expected {expected_code}: {err}"
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


def remote_code_checkpoint(folder: Path, marker: Path) -> Path:
    """A folder that looks like a quantized checkpoint whose model is defined by its own Python
    file; importing that file would create ``marker``."""
    folder.mkdir(parents=True)
    (folder / "modeling_sneaky.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    (folder / "configuration_sneaky.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "sneaky_unknown_to_transformers",
        "architectures": ["SneakyLM"],
        "auto_map": {"AutoConfig": "configuration_sneaky.SneakyConfig", "AutoModel": "modeling_sneaky.SneakyLM"},
        "vocab_size": 64,
        "quantization_config": {"quant_method": "qdlm", "provenance": {"source": str(EMBEDDED)}},
    }))
    return folder


# ------------------------------------------------------------------ the real console script
# (id, args with {tmp} for the case's folder, exit code, key words of stderr (stdout for help)).
# One per kind; the other values of each kind run in process below (each start imports torch).
SUBPROCESS_CASES = [
    ("help", ["-h"], 0, ["Usage: qdlm-export", "--install-completion", "quantize", "inspect", "push", "convert",
                         "bench", "eval"]),
    ("typo-option", ["quantize", "--outt", "{tmp}/out"], 2, ["Usage: qdlm-export quantize", "No such option: --outt"]),
    ("missing-required-option", ["quantize"], 2, ["Usage: qdlm-export quantize", "Missing option '--out'"]),
    ("unknown-command", ["frobnicate"], 2, ["Usage: qdlm-export", "No such command 'frobnicate'"]),
    ("typed-option", ["quantize", "--out", "{tmp}/out", "--bits", "four"], 2, ["Usage:", "'--bits'", "integer"]),
    ("missing-argument", ["push", "{tmp}/ckpt"], 2, ["Usage: qdlm-export push", "Missing argument 'REPO_ID'"]),
    ("closed-choice", ["quantize", "--out", "{tmp}/out", "--method", "magic"], 2,
     ["'--method'", "'magic' is not one of", "'gptq'", "'rtn'", "'smoothquant'"]),
    ("out-of-range", ["eval", "{tmp}/ckpt", "--batch-size", "0"], 2, ["'--batch-size'", "0 is out of range", ">= 1"]),
    ("non-finite", ["convert", "{tmp}/ckpt", "--to", "gptq", "--out", "{tmp}/out", "--max-shard-size", "inf"], 2,
     ["'--max-shard-size'", "'inf'", "5GiB"]),
    ("bench-remote-code", ["bench", "{tmp}/sneaky", "--no-kernels"], 1,
     ["--trust-remote-code", "modeling_sneaky.py", "configuration_sneaky.py"]),
]


def _run_script(case, root: Path):
    name, args, _, _ = case
    tmp = root / name
    tmp.mkdir()
    (tmp / "ckpt").mkdir()
    if "remote-code" in name:
        remote_code_checkpoint(tmp / "sneaky", tmp / "marker")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("QDLM_DEBUG", None)
    proc = subprocess.run(
        [str(SCRIPT), *[a.format(tmp=tmp) for a in args]], capture_output=True, text=True, env=env, timeout=120, cwd=tmp
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def script_results(tmp_path_factory):
    """Every subprocess case, two at a time (each start imports torch: ~2-3 s)."""
    assert SCRIPT.is_file(), f"the console script is not installed at {SCRIPT}"
    root = tmp_path_factory.mktemp("script")
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip([c[0] for c in SUBPROCESS_CASES], pool.map(lambda c: _run_script(c, root), SUBPROCESS_CASES)))
    return root, results


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_console_script_usage_errors(script_results, case):
    root, results = script_results
    name, _, expected, needles = case
    code, out, err = results[name]
    assert_clean(code, out if name == "help" else err, expected, needles)
    assert not (root / name / "out").exists(), "a failed command created its --out folder"
    assert not (root / name / "marker").exists(), "the checkpoint's own code ran without --trust-remote-code"


# ------------------------------------------------------------------------- in process, the rest
QUANTIZE_CASES = [
    (["--batch-size", "0"], ["'--batch-size'", "0 is out of range", ">= 1"]),
    (["--batch-size", "-4"], ["'--batch-size'", "-4"]),
    (["--nsamples", "0"], ["'--nsamples'", ">= 1"]),
    (["--nsamples", "-1"], ["'--nsamples'", ">= 1"]),
    (["--seqlen", "0"], ["'--seqlen'", ">= 2"]),
    (["--seed", "-1"], ["'--seed'", "-1 is out of range", "2**63-1"]),
    (["--seed", str(2**64)], ["'--seed'", str(2**64), "2**63-1"]),
    (["--device", "tpu"], ["'--device'", "'tpu'", "cpu, cuda, cuda:N or auto"]),
    (["--device", "cuda:x"], ["'--device'", "'cuda:x'"]),
    (["--compute-dtype", "float64"], ["'--compute-dtype'", "'float64'", "'bfloat16'"]),
    (["--method", "gptq", "--damp", "inf"], ["'--damp'", "inf is not a finite number"]),
    (["--method", "smoothquant", "--alpha", "nan"], ["'--alpha'", "nan is not a finite number"]),
    (["--max-shard-size", "0"], ["'--max-shard-size'", "'0'", "5GiB"]),
    (["--max-shard-size", "nan"], ["'--max-shard-size'", "'nan'"]),
    (["--max-shard-size", "inf"], ["'--max-shard-size'", "'inf'"]),
    (["--max-shard-size", "lots"], ["'--max-shard-size'", "'lots'", "5GB"]),
    (["--max-shard-size", "5XB"], ["'--max-shard-size'", "'5XB'"]),
    (["--max-shard-size", "5gb"], ["'--max-shard-size'", "lowercase b means bits"]),
    (["--scale-dtype", "float8"], ["'--scale-dtype'", "'float16'", "'bfloat16'", "'float32'"]),
    (["--group-fallback", "maybe"], ["'--group-fallback'", "'error'", "'per-channel'"]),
    (["--act-granularity", "row"], ["'--act-granularity'", "'token'", "'tensor'"]),
    (["--calib-masking", "half"], ["'--calib-masking'", "'random'", "'none'", "'auto'"]),
    (["--format", "exl2"], ["'--format'", "'native'", "'compressed-tensors'"]),
    (["--bits", "5"], ["--bits 5", "2, 3, 4, 8"]),
    (["--bits", "2.5"], ["'--bits'", "integer"]),
    (["-O", "nope=1"], ["-O nope", "rtn accepts:"]),
    (["--method", "gptq", "-O", "block_size=abc"], ["-O block_size='abc'", "integer"]),
    (["--method", "gptq", "-O", "damp=nan"], ["-O damp='nan'", "finite number"]),
    (["--method", "gptq", "-O", "damp=-inf"], ["-O damp='-inf'", "finite number"]),
    (["--method", "gptq", "-O", "act_order=maybe"], ["-O act_order='maybe'", "true or false"]),
    (["--method", "gptq", "-O", "damp"], ["-O 'damp' is not KEY=VALUE", "gptq accepts:"]),
    (["--method", "quarot", "-O", "act_clip_ratio=2"], ["act_clip_ratio", "(0, 1]"]),
    (["--method", "rtn", "--damp", "0.1"], ["damp", "rtn accepts:"]),
    # range errors of -O keys name the key as the user wrote it (no --block-size flag exists) and the range
    (["--method", "gptq", "-O", "block_size=0"], ["-O block_size=0 is invalid", "accepts an integer >= 1"]),
    (["--method", "awq", "-O", "grid=0"], ["-O grid=0", "accepts an integer >= 1"]),
    (["--method", "awq", "-O", "max_shrink=1"], ["-O max_shrink=1.0", "[0, 1)"]),
    (["--method", "duquant", "-O", "swc=0"], ["-O swc=0.0", "at most 1"]),
    (["--method", "duquant", "-O", "rotation_tokens=0"], ["-O rotation_tokens=0", ">= 1"]),
    (["--method", "duquant", "-O", "max_rotation_steps=-1"], ["-O max_rotation_steps=-1", ">= 0"]),
    (["--method", "duquant", "--alpha", "2"], ["--alpha 2.0 must be in [0, 1]", "from 0 to 1"]),
    (["--method", "quarot", "--damp", "-1"], ["--damp -1.0 must be non-negative", ">= 0"]),
]


@pytest.mark.parametrize("args,needles", QUANTIZE_CASES, ids=[" ".join(a) for a, _ in QUANTIZE_CASES])
def test_quantize_option_values(monkeypatch, capsys, tmp_path, args, needles):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(out_dir), *args)
    assert_clean(code, err, 2, needles)
    assert "hint:" in err or "Usage: qdlm-export quantize" in err, f"neither a hint nor click's usage line: {err}"
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


OTHER_CASES = [
    (["inspect"], ["Usage: qdlm-export inspect", "Missing argument 'FOLDER'"]),
    (["convert", "--to", "gptq", "--out", "{tmp}/out"], ["Usage: qdlm-export convert", "Missing argument"]),
    (["convert", "{tmp}/ckpt", "--to", "exl2", "--out", "{tmp}/out"], ["'--to'", "'exl2'", "'gptq'", "'awq'"]),
    (["convert", "{tmp}/ckpt", "--out", "{tmp}/out"], ["Missing option '--to'"]),
    (["inspect", "{tmp}/ckpt", "--tokens", "0"], ["'--tokens'", ">= 1"]),
    (["inspect", "{tmp}/ckpt", "--device", "tpu"], ["'--device'", "'tpu'", "cpu, cuda, cuda:N"]),
    (["bench", "--seqlen", "0"], ["'--seqlen'", "0 is out of range"]),
    (["bench", "--device", "auto"], ["'--device'", "'auto'"]),
    (["bench", "--fast"], ["No such option: --fast"]),
    (["eval", "{tmp}/ckpt", "--batch-size", "-1"], ["'--batch-size'", ">= 1"]),
    (["eval", "{tmp}/ckpt", "--mc-num", "0"], ["'--mc-num'", ">= 1"]),
    (["eval", "{tmp}/ckpt", "--limit", "-1"], ["'--limit'", "positive number of examples"]),
    (["eval", "{tmp}/ckpt", "--limit", "nan"], ["'--limit'", "nan"]),
    (["eval", "{tmp}/ckpt", "--limit", "0"], ["'--limit'"]),
    (["eval", "{tmp}/ckpt", "--num-fewshot", "-1"], ["'--num-fewshot'", ">= 0"]),
    (["eval", "{tmp}/ckpt", "--seed", str(2**32)], ["'--seed'", "2**32-1"]),
    (["eval", "{tmp}/ckpt", "--dtype", "float64"], ["'--dtype'", "'auto'", "'float32'"]),
    (["eval", "{tmp}/ckpt", "--device", "gpu"], ["'--device'", "'gpu'"]),
    (["eval"], ["Usage: qdlm-export eval", "Missing argument"]),
    (["push", "{tmp}/ckpt", "me/repo", "--privat"], ["No such option: --privat", "--private"]),
    (["quantize", "--out", "{tmp}/out", "--help-me"], ["No such option: --help-me"]),
    (["--loud"], ["No such option: --loud"]),
    # click's parser raises these without a context: main() restores the command's usage line
    (["quantize", "--out"], ["Usage: qdlm-export quantize", "Try 'qdlm-export quantize -h'", "'--out' requires an argument"]),
    (["eval", "{tmp}/ckpt", "--mc-num"], ["Usage: qdlm-export eval", "'--mc-num' requires an argument"]),
]


@pytest.mark.parametrize("args,needles", OTHER_CASES, ids=[" ".join(a) for a, _ in OTHER_CASES])
def test_other_commands_option_values(monkeypatch, capsys, tmp_path, args, needles):
    (tmp_path / "ckpt").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, *[a.format(tmp=tmp_path) for a in args])
    assert_clean(code, err, 2, needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cuda_asked_for_without_cuda(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["quantize", "--out", str(tmp_path / "out")], ["bench"], ["eval", str(tmp_path)]):
        code, _, err = run_cli(monkeypatch, capsys, *command, "--device", "cuda")
        assert_clean(code, err, 2, ["'--device'", "no CUDA device is available", "use cpu"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ main()'s boundary
def _fail_with(monkeypatch, exc: BaseException):
    import qdlm_export.quantize.api as q

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(q, "quantize", boom)


@pytest.mark.parametrize(
    "exc,needles",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/.stage/model.safetensors"),
         ["no space left on the device at /data/out/.stage/model.safetensors", "free some space"]),
        (OSError(errno.ENOSPC, "No space left on device"), ["no space left on the device while writing --out", "free some space"]),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), ["read-only file system at /ro/out", "writable"]),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), ["permission denied at /root/x", "permissions"]),
        (OSError(errno.ENAMETOOLONG, "File name too long", "/t/" + "a" * 300), ["file name too long at /t/aaa", "shorter"]),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/t/file/out"), ["is a file, not a folder", "/t/file/out"]),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/t/dir"), ["is a folder, not a file at /t/dir"]),
        (MemoryError(), ["out of memory", "--nsamples", "--batch-size"]),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                      "allocate 1099511627776 bytes."), ["out of memory", "--nsamples"]),
        (RuntimeError("std::bad_alloc"), ["out of memory", "--seqlen"]),
    ],
    ids=["ENOSPC", "ENOSPC-no-path", "EROFS", "EACCES", "ENAMETOOLONG", "ENOTDIR", "EISDIR", "MemoryError", "cpu-alloc", "bad_alloc"],
)
def test_resource_failures_are_named_not_bugs(monkeypatch, capsys, tmp_path, exc, needles):
    _fail_with(monkeypatch, exc)
    monkeypatch.delenv("QDLM_DEBUG", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(tmp_path / "o"), "--no-verify")
    assert_clean(code, err, 1, needles)
    assert "hint:" in err


def test_out_that_is_not_utf8_is_refused_at_the_door(monkeypatch, capsys, tmp_path):
    """A name whose bytes are not UTF-8 arrives as surrogates: safetensors cannot write under it (it
    once ended in UnicodeEncodeError, exit 3, after the work)."""
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", out, "--no-verify")
    assert_clean(code, err, 1, ["is not a valid UTF-8 path", "hint:"])
    assert list(tmp_path.iterdir()) == []


def test_real_defects_still_say_internal_error(monkeypatch, capsys, tmp_path):
    _fail_with(monkeypatch, ZeroDivisionError("division by zero"))
    monkeypatch.delenv("QDLM_DEBUG", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(tmp_path / "o"))
    assert code == 3 and "internal error: ZeroDivisionError" in err and "Traceback" not in err


class _Terminated(KeyboardInterrupt):
    """Like output.Terminated: a KeyboardInterrupt carrying the signal that caused it."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signum}")
        self.signum = signum


@pytest.mark.parametrize(
    "exc,expected",
    [(KeyboardInterrupt(), 130), (_Terminated(signal.SIGTERM), 128 + signal.SIGTERM), (_Terminated(signal.SIGHUP), 128 + signal.SIGHUP)],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_interrupts_exit_with_the_signal(monkeypatch, capsys, tmp_path, exc, expected):
    _fail_with(monkeypatch, exc)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(tmp_path / "o"))
    assert code == expected
    assert "interrupted; no output was left behind" in err and "Traceback" not in err and "internal error" not in err


def test_allow_non_finite_is_passed_only_when_given(monkeypatch, capsys, tmp_path):
    import qdlm_export.quantize.api as q
    from qdlm_export.errors import ConfigError

    def fake(model, out, config, *, allow_non_finite: bool = False, **kwargs):
        raise ConfigError(f"saw allow_non_finite={allow_non_finite} explicit={'allow_non_finite' in kwargs}")

    seen = {}

    def record(model, out, config, **kwargs):
        seen.update(kwargs)
        return fake(model, out, config, **kwargs)

    record.__signature__ = __import__("inspect").signature(fake)
    monkeypatch.setattr(q, "quantize", record)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(tmp_path / "o"))
    assert code == 2 and "saw allow_non_finite=False" in err and "allow_non_finite" not in seen
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(tmp_path / "o"), "--allow-non-finite")
    assert code == 2 and "saw allow_non_finite=True" in err and seen["allow_non_finite"] is True


# ------------------------------------------------------------------ --trust-remote-code (library)
def test_library_refuses_remote_code_unless_trusted(tmp_path):
    from qdlm_export.bench.model import run_model_benchmark
    from qdlm_export.errors import UnsupportedModelError
    from qdlm_export.core.remote_code import remote_code_files

    marker = tmp_path / "marker"
    folder = remote_code_checkpoint(tmp_path / "sneaky", marker)
    assert remote_code_files(folder) == ["configuration_sneaky.py", "modeling_sneaky.py"]
    assert remote_code_files(EMBEDDED.parent / "does-not-exist") is None  # a Hub id: transformers decides
    with pytest.raises(UnsupportedModelError) as info:
        run_model_benchmark(folder, seqlen=8, device="cpu")
    assert "modeling_sneaky.py" in info.value.message and "--trust-remote-code" in info.value.hint
    from qdlm_export.eval.evaluate import evaluate_checkpoint

    with pytest.raises(UnsupportedModelError) as info:
        evaluate_checkpoint(folder, ["qdlm_stdlib_mc"], limit=1, write=False)
    assert "modeling_sneaky.py" in info.value.message
    assert not marker.exists()


@pytest.fixture(scope="module")
def embedded_w4(tmp_path_factory):
    from qdlm_export.quantize.api import make_config, quantize

    out = tmp_path_factory.mktemp("bench") / "w4"
    quantize(str(EMBEDDED), out, make_config("rtn"), trust_remote_code=True, verify=False, device="cpu")
    return out


def _drop_a_scale(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    key = sorted(k for k in tensors if k.endswith("weight_scale"))[0]
    del tensors[key]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("case", ["staging", "source-model", "missing-scale", "moved-copy"])
def test_bench_validates_the_checkpoint_first(monkeypatch, capsys, tmp_path, embedded_w4, case):
    """bench runs inspect's validation (and finds the original as eval does) before any timing: a
    staging folder, a full-precision model or a damaged checkpoint is named, not a KeyError (exit 3)
    nor transformers' offline OSError; a copied checkpoint still finds its original."""
    import shutil

    folder = tmp_path / (".out.partial-x1" if case == "staging" else "ckpt")
    shutil.copytree(EMBEDDED if case == "source-model" else embedded_w4, folder)
    needles = {"staging": ["staging folder", ".qdlm-incomplete"], "source-model": ["not a quantized checkpoint"]}.get(case)
    if case == "staging":
        (folder / ".qdlm-incomplete").write_text("{}")
    if case == "missing-scale":
        needles = [_drop_a_scale(folder), "missing"]
    if case == "moved-copy":  # made by `quantize tiny-llada` from the model's parent folder, then copied
        assert (folder / "qdlm_source.local").is_file()
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["provenance"]["source"] = "tiny-llada"
        (folder / "config.json").write_text(json.dumps(config))
        monkeypatch.chdir(tmp_path)
    import qdlm_export.bench.model as bench_model

    timed = []
    monkeypatch.setattr(bench_model, "_time_forward", lambda *a, **k: timed.append(1) or 1.0)
    code, out, err = run_cli(monkeypatch, capsys, "bench", str(folder), "--no-kernels", "--seqlen", "8",
                             "--device", "cpu", "--trust-remote-code", "--json")
    if case == "moved-copy":  # provenance says a relative source; the recorded absolute path is used
        assert code == 0, err
        assert json.loads(out)["step"]["checkpoint"] == str(folder) and timed
        return
    assert_clean(code, err, 1, needles)
    assert "hint:" in err and not timed


EVAL_CASES = [
    (["--tasks", "qdlm_stdlib_mc,nope_task"], ["unknown lm-eval task: nope_task", "lm-eval ls tasks", "--include-path"]),
    (["--include-path", "{tmp}/nope"], ["--include-path {tmp}/nope does not exist", "task YAML"]),
    (["-O", "steps=abc"], ["-O steps='abc' is invalid", "accepts an integer >= 1"]),
    (["-O", "gen_length=0"], ["-O gen_length=0 is invalid", "integer >= 1"]),
    (["-O", "alg=fast"], ["-O alg='fast' is invalid", "entropy", "origin"]),
    (["-O", "top_p=0"], ["-O top_p=0 is invalid", "(0, 1]"]),
    (["-O", "check_greedy=2"], ["-O check_greedy=2 is invalid", "true or false"]),
    (["-O", "gen_length=64", "-O", "block_length=48"], ["gen_length=64 is not a multiple of -O block_length=48"]),
    (["--mc-num", "5", "--batch-size", "2"], ["--mc-num 5 must be a multiple of --batch-size 2", "--mc-num 6"]),
]


@pytest.mark.parametrize("args,needles", EVAL_CASES, ids=[" ".join(a) for a, _ in EVAL_CASES])
def test_eval_refuses_bad_tasks_and_model_arguments(monkeypatch, capsys, tmp_path, embedded_w4, args, needles):
    """Refused with the value and what is accepted, never lm-eval's KeyError or a generation
    ValueError as an internal error (exit 3), and never silently ignored (steps=abc once ran)."""
    before = {p.name: p.read_bytes() for p in embedded_w4.iterdir() if p.is_file()}
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(embedded_w4), "--trust-remote-code", "--limit", "1",
                           "--no-nll", *[a.format(tmp=tmp_path) for a in args])
    assert_clean(code, " ".join(err.split()), 2, [n.format(tmp=tmp_path) for n in needles])
    assert "hint:" in err
    assert {p.name: p.read_bytes() for p in embedded_w4.iterdir() if p.is_file()} == before


def test_eval_command_refuses_remote_code_unless_trusted(monkeypatch, capsys, tmp_path):
    marker = tmp_path / "marker"
    folder = remote_code_checkpoint(tmp_path / "sneaky", marker)
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(folder), "--limit", "1", "--json")
    assert_clean(code, err, 1, ["--trust-remote-code", "modeling_sneaky.py", "configuration_sneaky.py"])
    assert not marker.exists()


def test_native_model_without_auto_map_needs_no_trust(tmp_path):
    from qdlm_export.core.remote_code import remote_code_files, require_trust

    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    assert remote_code_files(folder) == []
    require_trust(folder, False)  # nothing to refuse
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.Tok", None]}}))
    (folder / "tok.py").write_text("raise SystemExit('must not run')\n")
    assert remote_code_files(folder) == ["tok.py"]


# ------------------------------------------------------------------ library validation (Python API)
@pytest.mark.parametrize(
    "method,options,needles",
    [
        ("gptq", {"damp": math.nan}, ["--damp nan", "finite"]),
        ("gptq", {"damp": math.inf}, ["--damp inf", "finite"]),
        ("quarot", {"damp": -math.inf}, ["--damp -inf", "finite"]),
        ("smoothquant", {"alpha": math.nan}, ["--alpha nan", "finite"]),
        ("duquant", {"swc": math.inf}, ["-O swc inf", "finite"]),
        ("awq", {"max_shrink": math.nan}, ["-O max_shrink nan", "finite"]),
        ("rtn-wa", {"act_clip_ratio": math.nan}, ["-O act_clip_ratio nan", "finite"]),
    ],
)
def test_configs_refuse_non_finite_numbers(method, options, needles):
    from qdlm_export.errors import ConfigError
    from qdlm_export.quantize.api import make_config

    with pytest.raises(ConfigError) as info:
        make_config(method, **options)
    text = f"{info.value.message} {info.value.hint}"
    for needle in needles:
        assert needle in text, text
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "method,options,needles",
    [
        ("rtn", {"bits": "four"}, ["bits='four'", "an int", "--bits"]),
        ("rtn", {"bits": 4.0}, ["bits=4.0", "an int"]),
        ("rtn", {"symmetric": "no"}, ["symmetric='no'", "a bool"]),
        ("gptq", {"damp": "0.01"}, ["damp='0.01'", "a number"]),
        ("gptq", {"block_size": True}, ["block_size=True", "an int", "-O block_size"]),
        ("awq", {"clip_tokens": 1.5}, ["clip_tokens=1.5", "an int or None"]),
    ],
)
def test_configs_check_argument_types(method, options, needles):
    from qdlm_export.errors import ConfigError
    from qdlm_export.quantize.api import make_config

    with pytest.raises(ConfigError) as info:
        make_config(method, **options)
    assert isinstance(info.value, TypeError)  # ArgumentTypeError: also a TypeError for Python callers
    text = f"{info.value.message} {info.value.hint}"
    for needle in needles:
        assert needle in text, text


def test_configs_accept_what_the_cli_produces():
    """Ints for float fields and None for optional ones stay valid (what JSON and the CLI give)."""
    from qdlm_export.quantize.api import make_config

    assert make_config("gptq", damp=0).damp == 0
    assert make_config("smoothquant", alpha=1).alpha == 1
    assert make_config("awq", clip_tokens=None).clip_tokens is None
    config = make_config("gptq", damp=0.05, block_size=64)
    json.dumps(config.to_dict(), allow_nan=False)  # strict JSON


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        ({"nsamples": 0}, ["--nsamples 0", "positive"]),
        ({"nsamples": -3}, ["--nsamples -3"]),
        ({"seqlen": 1}, ["--seqlen 1", "at least 2"]),
        ({"seed": -1}, ["--seed -1", "2**63-1"]),
        ({"seed": 2**64}, ["--seed", "2**63-1"]),
        ({"nsamples": "128"}, ["nsamples='128'", "an int"]),
        ({"nsamples": 12.0}, ["nsamples=12.0", "an int"]),
        ({"masking": "half"}, ["--calib-masking 'half'", "auto"]),
    ],
)
def test_calibration_config_validation(kwargs, needles):
    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        CalibrationConfig(**kwargs)
    text = f"{info.value.message} {info.value.hint}"
    for needle in needles:
        assert needle in text, text
    assert info.value.hint


def _api_call(function: str, tmp_path: Path, **kwargs):
    """The public entry point ``function`` on a folder that need not exist: every case fails on its
    arguments before anything is read."""
    folder = tmp_path / "ckpt"
    if function == "inspect_checkpoint":
        from qdlm_export.format.validation import inspect_checkpoint

        return inspect_checkpoint(kwargs.pop("folder", folder), **kwargs)
    if function == "evaluate_checkpoint":
        from qdlm_export.eval.evaluate import evaluate_checkpoint

        args = {"quantized_dir": folder, "tasks": ["qdlm_stdlib_mc"], "write": False, "trust_remote_code": True}
        return evaluate_checkpoint(**{**args, **kwargs})
    if function == "push_checkpoint":
        from qdlm_export.hub.push import push_checkpoint

        return push_checkpoint(kwargs.pop("folder", folder), "me/repo", **kwargs)
    from qdlm_export.quantize.api import make_config, quantize

    return quantize(str(EMBEDDED), tmp_path / "out", make_config("rtn"), trust_remote_code=True, verify=False, **kwargs)


@pytest.mark.parametrize(
    "function,kwargs,error,needles",
    [
        ("inspect_checkpoint", {"tokens": 0}, "ConfigError", ["--tokens 0", ">= 1"]),
        ("inspect_checkpoint", {"tokens": "5"}, "ArgumentTypeError", ["--tokens", "str '5'"]),
        ("inspect_checkpoint", {"device": "tpu"}, "ConfigError", ["--device 'tpu'", "cpu, cuda, cuda:N"]),
        ("inspect_checkpoint", {"folder": None}, "ArgumentTypeError", ["argument folder", "NoneType"]),
        ("evaluate_checkpoint", {"write": "no"}, "ArgumentTypeError", ["argument write", "str 'no'", "True or False"]),
        ("evaluate_checkpoint", {"trust_remote_code": "no"}, "ArgumentTypeError", ["argument trust_remote_code"]),
        ("evaluate_checkpoint", {"nll": 1}, "ArgumentTypeError", ["argument nll", "int 1"]),
        ("evaluate_checkpoint", {"offline": "yes"}, "ArgumentTypeError", ["argument offline", "(or None)"]),
        ("evaluate_checkpoint", {"tasks": 5}, "ArgumentTypeError", ["argument tasks", "list of str"]),
        ("evaluate_checkpoint", {"device": "tpu"}, "ConfigError", ["--device 'tpu'", "cpu, cuda, cuda:N"]),
        ("evaluate_checkpoint", {"dtype": "float64"}, "ConfigError", ["--dtype 'float64'", "bfloat16"]),
        ("evaluate_checkpoint", {"quantized_dir": None}, "ArgumentTypeError", ["argument quantized_dir"]),
        ("push_checkpoint", {"private": "no"}, "ArgumentTypeError", ["argument private", "str 'no'"]),
        ("push_checkpoint", {"folder": 7}, "ArgumentTypeError", ["argument folder", "int 7"]),
        ("quantize", {"device": "tpu"}, "ConfigError", ["--device 'tpu'", "or auto"]),
        ("quantize", {"device": "cuda:x"}, "ConfigError", ["--device 'cuda:x'"]),
    ],
)
def test_python_api_checks_its_arguments(tmp_path, function, kwargs, error, needles):
    """A wrong type or value fails at entry naming the argument (not torch's RuntimeError for
    'tpu', not a truthy 'no' taken for True), before anything is read or written."""
    from qdlm_export.errors import QdlmError

    with pytest.raises(QdlmError) as info:
        _api_call(function, tmp_path, **kwargs)
    assert type(info.value).__name__ == error and info.value.exit_code == 2 and info.value.hint
    text = f"{info.value.message} {info.value.hint}"
    for needle in needles:
        assert needle in text, text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text,expected",
    [("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("500MB", 500 * 10**6), ("1.5MB", 1_500_000), ("2KiB", 2048),
     ("123", 123), ("  7 TB ", 7 * 10**12), ("4mib", 4 * 2**20), ("10B", 10)],
)
def test_max_shard_size_follows_transformers_convention(text, expected):
    from qdlm_export.cli.options import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-5GB", "nan", "inf", "1e400GB", "5XB", "GB", "", "5 G B", "0.1B", "5gb", "5Mb", "10b"])
def test_max_shard_size_refusals(text):
    from qdlm_export.cli.options import parse_size
    from qdlm_export.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_size(text)
    assert "--max-shard-size" in info.value.message and info.value.hint


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        ({"mc_num": 0}, ["--mc-num 0", ">= 1"]),
        ({"batch_size": 0}, ["--batch-size 0", ">= 1"]),
        ({"limit": -1}, ["--limit -1", "positive"]),
        ({"limit": math.nan}, ["--limit nan"]),
        ({"seed": 2**40}, ["--seed", "2**32-1"]),
        ({"model_args": {"gen_lenght": 8}}, ["-O gen_lenght", "gen_length"]),
        ({"model_args": {"mc_num": 8}}, ["-O mc_num", "--mc-num"]),
        ({"model_args": {"temperature": math.inf}}, ["-O temperature=inf", "finite"]),
    ],
)
def test_evaluate_checkpoint_checks_its_numbers(tmp_path, kwargs, needles):
    from qdlm_export.errors import ConfigError
    from qdlm_export.eval.evaluate import evaluate_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llada", "quantization_config": {"quant_method": "qdlm", "provenance": {"source": str(EMBEDDED)}},
    }))
    with pytest.raises(ConfigError) as info:
        evaluate_checkpoint(folder, ["qdlm_stdlib_mc"], write=False, trust_remote_code=True, **kwargs)
    text = f"{info.value.message} {info.value.hint}"
    for needle in needles:
        assert needle in text, text
