"""`bench` runs on CPU: a denoising step of the embedded default and tiny kernel shapes (ratios only;
no timing assertions, only structure and the memory bound)."""

import json

from qdlm_export.bench.kernels import run_kernel_benchmarks
from tests.cli_runner import run_cli


def test_bench_step_reports_ratios_and_memory(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--no-kernels", "--seqlen", "32", "--json")
    assert code == 0, err
    step = json.loads(out)["step"]
    assert step["dense_step_ms"] > 0 and step["quantized_step_ms"] > 0 and step["speedup"] > 0
    # W4 g128: packed codes + fp16 scales are about 4.1/16 of the bf16 bytes.
    assert step["linear_memory_ratio"] <= 0.3


def test_kernel_benchmarks_cover_every_op_against_dense():
    result = run_kernel_benchmarks(quick=True, device="cpu", m_values=[3], shapes=[(256, 128)], repeat=1, warmup=0)
    ops = {r["op"] for r in result["results"]}
    assert ops == {"weight_only", "w8a8", "w4a4"}
    for r in result["results"]:
        assert r["dense_ms"] > 0 and r["time_ms"] > 0 and abs(r["ratio"] - r["time_ms"] / r["dense_ms"]) < 0.02 * r["ratio"] + 0.01
