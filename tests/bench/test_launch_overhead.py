"""``benchmarks/launch_overhead.py``: the host time of each GPU op's call, with Triton's launches stubbed
on a machine without CUDA (nothing compiles or runs there, so the time is the Python around a launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "launch_overhead.py"


def test_stubbed_run_times_every_op_and_counts_its_launches(tmp_path):
    pytest.importorskip("triton", reason="the script stubs Triton's launch path")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--stubbed", "--m", "3", "--k", "256", "--n", "64",
                           "--calls", "40", "--blocks", "2", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["mode"] == "stubbed" and result["shape"] == {"M": 3, "K": 256, "N": 64}
    ops = result["ops"]
    # one GEMM launch for weight-only; the weight-activation ops quantize the rows first: two
    assert {name: row["launches_per_call"] for name, row in ops.items()} == {
        "weight_only_w4g128": 1.0, "w8a8": 2.0, "w4a4": 2.0}
    for row in ops.values():
        assert 0 < row["min_us"] <= row["median_us"] < 10_000
