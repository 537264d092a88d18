"""benchmarks/gpu_check.sh: its syntax, its CPU dry run, and the report writer's target verdicts."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_report  # noqa: E402 (benchmarks/ is not a package)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_writes_a_report_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "gpu_check"
    for step in ("tests", "bench", "steps", "gptq", "report"):
        assert f" {step} " in done.stdout  # the plan names every step
    assert "TRITON_INTERPRET=0" in done.stdout
    doc = (out / "benchmarks.md").read_text()
    assert doc.startswith((ROOT / "docs" / "benchmarks.md").read_text()[:200])  # the doc is kept, section appended
    assert doc.count("## GPU check: dry run (CPU)") == 1
    bench = json.loads((out / "bench.json").read_text())
    assert bench["kernels"]["results"], "the dry run's CPU bench measured nothing"
    targets = json.loads((out / "targets.json").read_text())
    assert {t["key"] for t in targets} == {"w8a8_large_m", "w4a16_small_m", "w4a16_m1024", "hadamard_share"}
    if importlib.util.find_spec("triton") is not None:  # the host-time step, stubbed here, stubs Triton
        overhead = json.loads((out / "overhead.json").read_text())
        assert overhead["mode"] == "stubbed" and set(overhead["ops"]) == {"weight_only_w4g128", "w8a8", "w4a4"}
        assert f"| weight_only_w4g128 | {overhead['ops']['weight_only_w4g128']['median_us']} |" in doc
    # the real doc is untouched by a dry run
    assert "## GPU check: dry run" not in (ROOT / "docs" / "benchmarks.md").read_text()


def _row(op, backend, M, time_ms, dense_ms, K=4096, N=4096):
    return dict(op=op, backend=backend, M=M, K=K, N=N, time_ms=time_ms, dense_ms=dense_ms)


def test_report_targets_use_the_fastest_backend_and_every_shape():
    kernels = {
        "results": [
            _row("w8a8", "torch._int_mm", 1024, 0.50, 1.0),  # 2.0x
            _row("w8a8", "triton", 1024, 0.80, 1.0),  # slower backend of the same shape: ignored
            _row("w8a8", "triton", 4096, 0.70, 1.0, N=12288),  # 1.43x: this shape misses 1.6x
            _row("weight_only", "triton", 16, 0.30, 1.0),  # 3.33x >= 2.5
            _row("weight_only", "triton", 1024, 1.20, 1.0),  # 0.83x < 0.9
        ]
    }
    steps = {"rows": [{"scheme": "quarot-w4a4", "tokens": 4096, "hadamard_share": 0.031}]}
    by_key = {t["key"]: t for t in gpu_report.evaluate_targets(kernels, steps)}
    assert by_key["w8a8_large_m"]["held"] is False and by_key["w8a8_large_m"]["value"] == pytest.approx(1 / 0.7, 1e-3)
    assert by_key["w4a16_small_m"]["held"] is True
    assert by_key["w4a16_m1024"]["held"] is False
    assert by_key["hadamard_share"]["held"] is True
    by_key = {t["key"]: t for t in gpu_report.evaluate_targets({"results": []}, None)}
    assert all(t["held"] is None for t in by_key.values())


def test_report_targets_in_gpu_time_take_each_swept_shapes_best_and_the_worst_shape():
    def row(op, M, N, **cands):
        return dict(op=op, M=M, K=4096, N=N,
                    candidates=[dict(name=k, vs_dense=v, rel_err_vs_torch=0.004) for k, v in cands.items()])

    wrong_but_fast = row("weight_only", 16, 4096, heuristic=0.4, tinygemm=2.7)
    wrong_but_fast["candidates"].append(dict(name="(16, 64, 128, 4, 4, 1, True)", vs_dense=9.0, rel_err_vs_torch=0.5))
    sweep = {"rows": [
        wrong_but_fast,  # a candidate that computed something else does not count
        row("weight_only", 16, 12288, heuristic=0.5, tinygemm=2.2),  # worst shape: 2.2 < 2.5
        row("weight_only", 1024, 4096, heuristic=0.95),
        row("int8", 1024, 4096, heuristic=1.9, **{"quantize+GEMM": 1.7}),  # the GEMM alone does not count
        row("int8", 4096, 4096, heuristic=1.8, **{"quantize+GEMM": 1.65}),
    ]}
    by_key = {t["key"]: t for t in gpu_report.evaluate_targets({"results": []}, None, sweep)}
    small = by_key["w4a16_small_m"]
    assert small["graph_value"] == 2.2 and small["graph_held"] is False and "12288 M=16 (tinygemm)" in small["graph_where"]
    assert by_key["w4a16_m1024"]["graph_held"] is True
    w8 = by_key["w8a8_large_m"]
    assert w8["graph_value"] == 1.65 and w8["graph_held"] is True and "quantize+GEMM" in w8["graph_where"]
    assert by_key["w8a8_large_m"]["held"] is None  # no eager bench rows: not measured eagerly
    assert gpu_report.evaluate_targets({"results": []}, None)[0]["graph_value"] is None


def test_report_section_replaces_only_its_own_device():
    doc = "# Benchmarks\n\nintro\n"
    doc = gpu_report.insert_section(doc, "NVIDIA H200", "## GPU check: NVIDIA H200 (d1)\nold\n")
    doc = gpu_report.insert_section(doc, "NVIDIA H100 80GB HBM3", "## GPU check: NVIDIA H100 (d1)\nother\n")
    doc = gpu_report.insert_section(doc, "NVIDIA H200", "## GPU check: NVIDIA H200 (d2)\nnew\n")
    assert doc.startswith("# Benchmarks\n\nintro\n")
    assert "old" not in doc and doc.count("## GPU check: NVIDIA H200") == 1 and "new" in doc and "other" in doc


def test_triton_sweep_runs_every_candidate_and_checks_it_against_torch(tmp_path):
    """The sweep gpu_check.sh runs, on the CPU in Triton's interpreter (--smoke): every candidate tile
    configuration computes what the torch backend computes, and the report renders its rows. Its tuned
    table (--table) holds the fastest right candidate of every row, merged into what the file held."""
    pytest.importorskip("triton")
    from qdlm_export.kernels import tuned

    table = tmp_path / "gpu.json"
    kept = {"op": "int8", "K": 12288, "N": 4096, "M": 16, "backend": "triton", "config": {"BLOCK_M": 16}}
    stale = {"op": "weight_only", "K": 256, "N": 128, "M": 3, "backend": "cuda_tinygemm", "config": None}
    table.write_text(json.dumps({"entries": [kept, stale]}))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_sweep.py"), "--smoke", "--json",
                           "--table", str(table)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    sweep = json.loads(done.stdout)
    written = json.loads(table.read_text())
    assert sweep["table"] == str(table) and written["device"] == sweep["device"]
    entries = {(e["op"], e["K"], e["N"], e["M"]): e for e in written["entries"]}
    assert entries.pop(("int8", 12288, 4096, 16)) == kept  # not measured now: kept
    assert set(entries) == {(r["op"], r["K"], r["N"], r["M"]) for r in sweep["rows"]}  # measured: replaced
    for r in sweep["rows"]:
        e = entries[(r["op"], r["K"], r["N"], r["M"])]
        fastest = min((c for c in r["candidates"] if c["name"] != "quantize+GEMM"), key=lambda c: c["graph_ms"])
        assert tuned._valid(e) and e["backend"] == {"dequant+cuBLAS": "triton_dequant"}.get(fastest["name"], "triton")
        assert e["config"] == (fastest["config"] if e["backend"] == "triton" else None)
    assert {(r["op"], r["M"]) for r in sweep["rows"]} == {(op, m) for op in ("weight_only", "int8", "w4a4") for m in (3, 40)}
    for r in sweep["rows"]:
        assert r["candidates"][0]["name"] == "heuristic" and len(r["candidates"]) >= 4
        for c in r["candidates"]:
            assert "error" not in c, c
            assert c["rel_err_vs_torch"] < 0.02  # bf16 outputs of the same products
    text = "\n".join(gpu_report.sweep_lines(sweep, None))
    assert text.count("| weight_only |") == 2 and "best candidate" in text


def test_triton_sweep_stops_at_its_time_budget_and_says_so():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_sweep.py"), "--smoke", "--json",
                           "--budget-s", "0"], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    sweep = json.loads(done.stdout)
    assert sweep["cut_short"] is True and sweep["rows"] == []
    assert "ran out of its time budget" in "\n".join(gpu_report.sweep_lines(sweep, None))


def test_triton_sweep_killed_by_its_time_limit_still_prints_what_it_measured():
    """gpu_check.sh runs the sweep under `timeout`: SIGTERM after the first row ends it with that row
    printed and the result marked cut short, not with the output lost."""
    import signal

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "triton_sweep.py"), "--smoke", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stderr:  # progress lines: one per measured row
            if " M=" in line and "dense" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0
    sweep = json.loads(out)
    assert sweep["cut_short"] is True and 1 <= len(sweep["rows"]) < 6
