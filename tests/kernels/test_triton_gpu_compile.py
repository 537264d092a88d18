"""The Triton kernels compile for a Hopper GPU, checked on the CPU (``benchmarks/triton_compile_check.py``).

The other kernel tests run in Triton's interpreter, which accepts programs the GPU compiler rejects
and knows nothing of shared memory or registers: a helper returning different shapes from its
constexpr branches passed every interpreted test, and did not compile for a GPU.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "qdlm_export" / "kernels"
SCRIPT = ROOT / "benchmarks" / "triton_compile_check.py"
EVERY_KERNEL = {"_wo_gemm_kernel", "_dequantize_kernel", "_quantize_rows_kernel", "_int8_gemm_kernel",
                "_packed_int_gemm_kernel", "_fwht_kernel", "_grouped_gemm_kernel"}
SPILL_LIMIT = 512  # bytes a thread: more is a tile the heuristic should not pick


def _jit_functions():
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                yield path.name, node


def test_jit_helpers_return_from_an_if_only_with_an_else():
    """Triton's compiler, unlike its interpreter, carries on past a constexpr branch that returned;
    a return after it of another shape fails to compile, of the same shape silently loses."""
    functions = list(_jit_functions())
    assert len(functions) >= 10, "no @triton.jit functions found: the kernels moved?"
    offenders = [
        f"{name}:{node.lineno} {fn.name}"
        for name, fn in functions
        for node in ast.walk(fn)
        if isinstance(node, ast.If) and not node.orelse and any(isinstance(n, ast.Return) for n in ast.walk(node))
    ]
    assert not offenders, "if-with-return but no else in @triton.jit functions: " + ", ".join(offenders)


def _compile(parts: list[str], arch: int = 90, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch), "--json", "--parts", *parts, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rows(procs: list[subprocess.Popen]) -> list[dict]:
    rows = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode == 3:  # this Triton cannot compile for CUDA here (no ptxas, other API)
                pytest.skip(err.strip().splitlines()[-1])
            assert out.strip(), err[-3000:]
            rows += json.loads(out)["rows"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return rows


@pytest.fixture(scope="module")
def hopper_rows():
    pytest.importorskip("triton", reason="the compile check needs Triton")
    # in parallel: a compile is one core's work; the (shorter) sweep also counts SASS instructions
    return _rows([_compile(["defaults"]), _compile(["sweep"], 90, "--sass")])


def test_every_kernel_compiles_for_hopper_within_its_shared_memory(hopper_rows):
    failed = [f"{r['kernel']} {r['constexprs']} warps={r['num_warps']}: {r['error']}" for r in hopper_rows if "error" in r]
    assert not failed, "\n".join(failed)
    assert {r["kernel"] for r in hopper_rows} == EVERY_KERNEL
    assert all(r["shared"] <= 232448 and r["registers"] for r in hopper_rows)
    assert len(hopper_rows) >= 100  # every launcher, scheme and tile class: the cases did not vanish


def test_what_a_loaded_model_launches_does_not_spill(hopper_rows):
    defaults = [r for r in hopper_rows if "default" in r["origins"] and "error" not in r]
    spilling = [f"{r['kernel']} {r['constexprs']} warps={r['num_warps']}: {r['spill_bytes']} B"
                for r in defaults if r["spill_bytes"] > SPILL_LIMIT]
    assert not spilling, "\n".join(spilling)


def test_weight_only_k_loops_wait_on_no_load(hopper_rows):
    """Every load of the weight-only GEMMs' K loops (activations, codes, the group's scales and zero
    points) is copied ahead by the pipeliner. Read from the checkpoint's [N, groups] rows (2 bytes a
    thread, strided), the scales stayed a synchronous load in all 40 grouped kernels' loops, which held
    201 registers (median) against 110 now (layouts.group_major_qparams)."""
    gemms = [r for r in hopper_rows if r["kernel"] in ("_wo_gemm_kernel", "_grouped_gemm_kernel")
             and "default" in r["origins"]]
    assert len(gemms) >= 30 and any(not r["constexprs"]["PER_CHANNEL"] for r in gemms)
    waiting = [f"{r['kernel']} {r['constexprs']}: {r['loop_loads']}" for r in gemms if r["loop_loads"]]
    assert not waiting, "\n".join(waiting)
    # the counter sees such a load: the activation quantizer's row loops have no MMA to pipeline for
    assert any(r["loop_loads"] for r in hopper_rows if r["kernel"] == "_quantize_rows_kernel")
    # --sass (the sweep here) counts one iteration of the main loop beside the whole kernel
    counted = [r for r in hopper_rows if "loop_sass" in r and r["kernel"] == "_wo_gemm_kernel"]
    assert counted and all(0 < r["loop_sass"]["total"] < r["sass"]["total"] for r in counted)


def test_hopper_mmas_where_tiles_allow_them(hopper_rows):
    """wgmma (Hopper's warp-group MMA) for 64-row tiles and up; the fused Hadamard of 12288 = 12 * 1024
    compiles as one kernel (its two-kernel fallback is for compilers that reject it)."""
    gemms = [r for r in hopper_rows if r["kernel"] in ("_int8_gemm_kernel", "_wo_gemm_kernel") and "error" not in r
             and r["constexprs"]["BLOCK_M"] >= 64 and not r["constexprs"].get("SWAP_AB")]
    assert gemms and all(r["mma"] == "wgmma" for r in gemms), [r for r in gemms if r["mma"] != "wgmma"]
    fused = [r for r in hopper_rows if r["kernel"] == "_fwht_kernel" and r["constexprs"]["K_ORD"] == 12]
    assert fused and all(r["mma"] == "wgmma" for r in fused)
    # the machine code agrees with the PTX: warp-group MMAs are HGMMA (floats) or IGMMA (int8)
    counted = [r for r in hopper_rows if "sass" in r]
    gmma = [r["sass"].get("HGMMA", 0) + r["sass"].get("IGMMA", 0) > 0 for r in counted]
    assert counted and gmma == [r["mma"] == "wgmma" for r in counted]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 89, 100, 120])
def test_what_a_loaded_model_launches_compiles_beyond_hopper(arch):
    """A100 (sm_80), L40S (sm_89), B200 (sm_100), RTX 5090 (sm_120): the launchers' picks compile within
    the shared memory those give a block, and the fused Hadamard (tuned for sm_90) is not among them.
    Before Hopper the picks spill little; the Blackwell tiles are Hopper's, unmeasured there."""
    pytest.importorskip("triton", reason="the compile check needs Triton")
    rows = _rows([_compile(["defaults"], arch)])
    failed = [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    assert {r["arch"] for r in rows} == {arch} and len(rows) >= 100
    if arch < 90:
        assert max(r["spill_bytes"] for r in rows) <= 1024
    assert not [r for r in rows if r["kernel"] == "_fwht_kernel" and r["constexprs"]["K_ORD"] > 1]


BAD_KERNEL = '''
import json, sys, torch, triton, triton.language as tl
sys.path.insert(0, sys.argv[1])
import triton_compile_check as tc

@triton.jit
def _transposed(v, FLIP: tl.constexpr):
    if FLIP:
        return v[:, None]
    return v[None, :]  # the interpreter never gets here when FLIP; the compiler does

@triton.jit
def _bad_kernel(x_ptr, y_ptr, FLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = _transposed(tl.load(x_ptr + offs), FLIP)
    tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], v + tl.zeros((BLOCK, BLOCK), tl.float32))

x = torch.empty(64)
with tc.compiling_for(90) as compiler:
    for flip in (False, True):
        tc._attempt(compiler, lambda: _bad_kernel[(1,)](x, x, FLIP=flip, BLOCK=64))
print(json.dumps([{k: v for k, v in r.items() if k != "origins"} for r in compiler.rows]))
'''


def test_the_check_reports_what_the_interpreter_accepts(tmp_path):
    """A helper whose constexpr branch returns a different shape than the statement after it: fine in
    the interpreter, a compile error for the GPU, which the check records instead of raising."""
    pytest.importorskip("triton", reason="the compile check needs Triton")
    script = tmp_path / "bad_kernel.py"
    script.write_text(BAD_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), str(SCRIPT.parent)], capture_output=True, text=True,
                          env=env, timeout=300)
    if "cannot compile for CUDA" in done.stderr or "No module named 'triton.backends.nvidia'" in done.stderr:
        pytest.skip("this Triton cannot compile for CUDA here")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    by_flip = {r["constexprs"]["FLIP"]: r for r in rows}
    assert "error" not in by_flip[False] and by_flip[False]["registers"]  # v[None, :] both times: compiles
    assert "Return type mismatch" in by_flip[True]["error"]
