"""Three back-to-back `qdlm-export bench --json` runs (the console script, default settings) agree
within 15 % on every ratio they report: every kernel row and the denoising step."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

AGREEMENT = 1.15  # largest / smallest of the three runs' ratios


def _console_script() -> str:
    beside = Path(sys.executable).parent / "qdlm-export"
    found = str(beside) if beside.exists() else shutil.which("qdlm-export")
    if found is None:
        pytest.fail("the qdlm-export console script is not installed (pip install -e .)")
    return found


def _ratios(result: dict) -> dict[str, float]:
    failed = [f"{r['op']}:{r['backend']}: {r['error']}" for r in result["kernels"]["results"] if "error" in r]
    assert not failed, failed
    ratios = {
        f"{r['op']}:{r['backend']} K={r['K']} N={r['N']} M={r['M']}": r["ratio"] for r in result["kernels"]["results"]
    }
    ratios["step"] = result["step"]["ratio"]
    return ratios


@pytest.mark.slow
def test_three_runs_agree_within_15_percent():
    runs = []
    for _ in range(3):
        done = subprocess.run([_console_script(), "bench", "--json"], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        runs.append(_ratios(json.loads(done.stdout)))
    assert runs[0].keys() == runs[1].keys() == runs[2].keys()
    spread = {key: max(r[key] for r in runs) / min(r[key] for r in runs) for key in runs[0]}
    print("\n".join(f"{key}: {[r[key] for r in runs]} -> {spread[key]:.3f}" for key in runs[0]))
    disagreeing = {key: [r[key] for r in runs] for key, s in spread.items() if s > AGREEMENT}
    assert not disagreeing, f"ratios differing by more than 15 % across three runs: {disagreeing}"
