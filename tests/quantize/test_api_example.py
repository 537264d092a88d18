"""The documented Python API: examples/api_quickstart.py (docs/API.md) runs as shipped, and the
package's version is its distribution's."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import qdlm_export

ROOT = Path(__file__).resolve().parents[2]


def test_api_quickstart_runs(tmp_path):
    out = tmp_path / "ckpt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "api_quickstart.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}: 14 linears" in proc.stdout
    assert "inspect: method=gptq bits=4 group_size=64" in proc.stdout
    assert "logits (1, 16, 2048)" in proc.stdout and "dequantized model" in proc.stdout
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["method"] == "gptq" and qconfig["calibration"]["nsamples"] == 16
    assert qconfig["provenance"]["tool_version"] == qdlm_export.__version__


def test_version_comes_from_the_distribution():
    assert qdlm_export.__version__ == importlib.metadata.version("qdlm-export")
    # pyproject.toml is the one place the number is written
    text = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{qdlm_export.__version__}"' in text
    assert not any(f'"{qdlm_export.__version__}"' in p.read_text(encoding="utf-8")
                   for p in (ROOT / "qdlm_export").rglob("*.py"))


def test_packaging_files():
    assert (ROOT / "qdlm_export" / "py.typed").is_file()
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "[project.urls]" in pyproject and '"py.typed"' in pyproject and 'calib = ["datasets' in pyproject
