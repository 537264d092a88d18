"""The CLI end to end, in process: success paths and every bad input of the foundation issue.

Each bad input must give a specific message, a non-zero exit code, no traceback, and leave nothing
written or overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli_runner import run_cli




def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_version_and_help(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip().startswith("qdlm-export ")
    for command in ("quantize", "inspect", "push", "convert", "bench", "eval"):
        for flag in ("--help", "-h"):
            code, out, _ = run_cli(monkeypatch, capsys, command, flag)
            assert code == 0 and "--json" in out and "Usage: qdlm-export " + command in out


def test_quantize_embedded_default_then_inspect(monkeypatch, capsys, tmp_path):
    out_dir = tmp_path / "w4"
    code, out, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(out_dir), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["quantized_modules"] == 14
    assert 4.0 < summary["bits_per_weight"] < 4.5
    assert 0 < summary["relative_output_error"] < 1
    assert summary["linear_bytes_quantized"] < 0.3 * summary["linear_bytes_original"]
    files = set(listing(out_dir))
    assert {"config.json", "model.safetensors", "README.md", "qdlm_report.json", "tokenizer.json",
            "modeling_llada.py", "configuration_llada.py", "generation_config.json"} <= files
    assert not any(name.startswith(".") for name in files)

    code, out, err = run_cli(monkeypatch, capsys, "inspect", str(out_dir), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["valid"] and info["method"] == "rtn" and info["bits"] == 4 and len(info["quantized_modules"]) == 14
    assert info["modules_not_converted"] == ["model.transformer.ff_out"]


def assert_clean_failure(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--method", "magic"], ["--method", "'magic' is not one of", "'rtn'", "'gptq'"]),
        (["--bits", "5"], ["--bits 5", "2, 3, 4, 8"]),
        (["--bits", "16"], ["--bits 16"]),
        (["--group-size", "0"], ["--group-size 0"]),
    ],
)
def test_bad_scheme_options(monkeypatch, capsys, tmp_path, args, needles):
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(tmp_path / "o"), *args)
    assert_clean_failure(code, err, *needles)
    assert listing(tmp_path) == []


def test_group_size_that_does_not_divide_names_the_layer(monkeypatch, capsys, tmp_path):
    from qdlm_export.fixtures import build_tiny_model

    src = build_tiny_model("llada", tmp_path / "src", intermediate_size=640)  # 640 % 256 != 0
    before = listing(tmp_path)
    code, _, err = run_cli(
        monkeypatch, capsys, "quantize", str(src), "--trust-remote-code", "--group-size", "256", "--out", str(tmp_path / "o")
    )
    assert_clean_failure(code, err, "model.transformer.blocks.0.ff_out", "640", "--group-fallback")
    assert listing(tmp_path) == before

    code, out, err = run_cli(
        monkeypatch, capsys, "quantize", str(src), "--trust-remote-code", "--group-size", "256",
        "--group-fallback", "per-channel", "--out", str(tmp_path / "o"), "--json", "--no-verify",
    )
    assert code == 0, err
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["module_overrides"] == {
        "model.transformer.blocks.0.ff_out": {"group_size": -1},
        "model.transformer.blocks.1.ff_out": {"group_size": -1},
    }
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "o"))
    assert code == 0, err


def test_missing_model_path(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_clean_failure(code, err, "does not exist")
    assert listing(tmp_path) == []


def test_remote_code_needs_explicit_trust(monkeypatch, capsys, tmp_path, tiny_dream):
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(tiny_dream), "--out", str(tmp_path / "o"))
    assert_clean_failure(code, err, "--trust-remote-code", "modeling_dream.py")
    assert listing(tmp_path) == []


def test_existing_output_is_never_overwritten_without_flag(monkeypatch, capsys, tmp_path, tiny_llada):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--out", str(out_dir))
    assert_clean_failure(code, err, "already exists", "--overwrite")
    assert listing(tmp_path) == ["o", "o/precious.txt"]

    # --overwrite replaces only a previous output of the tool (or an empty folder): never other content.
    code, _, err = run_cli(
        monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--out", str(out_dir), "--overwrite", "--no-verify"
    )
    assert_clean_failure(code, err, "other content", "precious.txt")
    assert listing(tmp_path) == ["o", "o/precious.txt"]

    (out_dir / "precious.txt").unlink()
    for _ in range(2):  # an empty folder, then the previous output
        code, _, err = run_cli(
            monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--out", str(out_dir), "--overwrite", "--no-verify"
        )
        assert code == 0, err
        assert (out_dir / "config.json").exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_nothing(monkeypatch, capsys, tmp_path, tiny_llada, failure):
    from qdlm_export.methods.rtn import RTN

    calls = {"n": 0}
    original = RTN.quantize_block

    def crash_on_second_block(self, block, prefix, calib):
        calls["n"] += 1
        if calls["n"] == 2:
            raise failure("simulated crash")
        return original(self, block, prefix, calib)

    monkeypatch.setattr(RTN, "quantize_block", crash_on_second_block)
    out_dir = tmp_path / "o"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--out", str(out_dir))
    assert code != 0 and "Traceback" not in err
    assert listing(tmp_path) == []  # neither the output nor a staging folder
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(out_dir))
    assert code != 0 and "Traceback" not in err


def test_inspect_names_the_broken_tensor(monkeypatch, capsys, tmp_path, tiny_llada):
    import torch
    from safetensors.torch import load_file, save_file

    out_dir = tmp_path / "o"
    run_cli(monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--out", str(out_dir), "--no-verify")
    weights = load_file(out_dir / "model.safetensors")

    broken = dict(weights)
    del broken["model.transformer.blocks.1.v_proj.weight_scale"]
    save_file(broken, out_dir / "model.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(out_dir))
    assert_clean_failure(code, err, "model.transformer.blocks.1.v_proj.weight_scale", "missing")

    broken = dict(weights)
    broken["model.transformer.blocks.0.q_proj.weight_packed"] = weights["model.transformer.blocks.0.q_proj.weight_packed"][:, :-1].contiguous()
    save_file(broken, out_dir / "model.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(out_dir))
    assert_clean_failure(code, err, "model.transformer.blocks.0.q_proj.weight_packed", "shape")

    broken = dict(weights)
    broken["model.transformer.blocks.0.k_proj.weight_scale"] = weights["model.transformer.blocks.0.k_proj.weight_scale"].to(torch.bfloat16)
    save_file(broken, out_dir / "model.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(out_dir))
    assert_clean_failure(code, err, "model.transformer.blocks.0.k_proj.weight_scale", "dtype")

    (out_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(out_dir))
    assert_clean_failure(code, err, "model.safetensors")


def test_pickle_only_model_is_refused(monkeypatch, capsys, tmp_path, tiny_llada):
    src = tmp_path / "src"
    shutil.copytree(tiny_llada, src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(src), "--trust-remote-code", "--out", str(tmp_path / "o"))
    assert_clean_failure(code, err, "safetensors", "pytorch_model.bin")
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_id_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "someone/not-here", "--out", str(tmp_path / "o"))
    assert_clean_failure(code, err, "could not download someone/not-here")
    assert listing(tmp_path) == []


def test_unknown_model_type_is_named(monkeypatch, capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(src), "--out", str(tmp_path / "o"))
    assert_clean_failure(code, err, "'mamba'", "llada")


def test_quantize_to_other_formats_and_convert(monkeypatch, capsys, tmp_path, tiny_llada):
    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--format", "gptq",
                           "--out", str(tmp_path / "g"), "--no-verify")
    assert code == 0, err
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4
    assert not [p for p in (tmp_path / "g").iterdir() if p.name.startswith(".")]

    code, _, err = run_cli(monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--format", "awq",
                           "--bits", "3", "--out", str(tmp_path / "a"))
    assert_clean_failure(code, err, "4-bit")
    assert not (tmp_path / "a").exists()

    run_cli(monkeypatch, capsys, "quantize", str(tiny_llada), "--trust-remote-code", "--out", str(tmp_path / "n"), "--no-verify")
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "n"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct"))
    assert code == 0, err
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "n"), "--to", "exl2", "--out", str(tmp_path / "x"))
    assert_clean_failure(code, err, "exl2")


def test_inspect_reports_the_kernel_backend_of_every_layer(monkeypatch, capsys, tmp_path):
    """Weight-only layers report the dequantize-GEMM, dynamic symmetric W4A4 layers the integer path
    (per-token quantize, then the integer GEMM) and their online Hadamards; a forced backend shows."""
    w4, w4a4 = tmp_path / "w4", tmp_path / "w4a4"
    assert run_cli(monkeypatch, capsys, "quantize", "--out", str(w4), "--no-verify")[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", str(w4a4), "--method", "quarot", "--bits", "4",
                           "--act-bits", "4", "--group-size", "-1", "--nsamples", "4", "--seqlen", "32", "--no-verify")
    assert code == 0, err
    code, out, _ = run_cli(monkeypatch, capsys, "inspect", str(w4), "--json", "--device", "cpu")
    info = json.loads(out)
    assert set(info["kernels"]) == set(info["quantized_modules"]) and info["kernel_device"] == "cpu"
    # bf16 checkpoints run on the native int4 kernel (kernels/cpu_native.py) or torch's packed CPU
    # kernels (kernels/cpu_packed.py), else dequantize + matmul
    assert all(plan.startswith(("cpu_native (", "cpu_packed (", "torch (dequantize")) for plan in info["kernels"].values())
    info = json.loads(run_cli(monkeypatch, capsys, "inspect", str(w4a4), "--json", "--device", "cpu")[1])
    plans = info["kernels"]
    # the integer GEMM: Intel AMX int8 tiles where the CPU has them (kernels/cpu_int8.py), else AVX512-VNNI
    # for the token count inspect describes (the same module), else torch._int_mm
    assert all("per-token" in plan and any(gemm in plan for gemm in ("_int_mm", "AMX int8 tiles", "AVX512-VNNI"))
               for plan in plans.values())
    assert "hadamard(768)" in plans["model.transformer.blocks.0.ff_out"]
    assert "hadamard" not in plans["model.transformer.blocks.0.q_proj"]
    # on the CPU a loaded model's online Hadamards are the format's reference (QdlmLinear runs that,
    # not the Hadamard op's backends), and their float32 output is what the quantizer reads
    down = plans["model.transformer.blocks.0.ff_out"]
    assert "hadamard(768): the format's reference" in down
    import torch

    from qdlm_export.kernels import select_backend

    fp32_quantizer = select_backend("quantize_per_token", "cpu", M=256, K=768, bits=4, dtype=torch.float32).name
    assert down.split("; ")[1].startswith(f"{fp32_quantizer} (")
    from qdlm_export.kernels import refresh_backend_setting

    monkeypatch.setenv("QDLM_KERNEL_BACKEND", "triton")
    refresh_backend_setting()  # the kernels read it once per process
    info = json.loads(run_cli(monkeypatch, capsys, "inspect", str(w4), "--json", "--device", "cpu")[1])
    assert all("unavailable" in plan or "triton" in plan for plan in info["kernels"].values())
