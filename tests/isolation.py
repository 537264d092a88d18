"""Shared by the tests that load checkpoints where qdlm_export cannot be imported: a fresh interpreter
with a meta-path blocker, fixed token inputs, and the relative error measure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

TOKENS = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))


BLOCKER = """
import importlib.abc, sys

class _NoQdlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "qdlm_export" or name.startswith("qdlm_export."):
            raise ImportError(name + " is not installed here")

sys.meta_path.insert(0, _NoQdlm())
try:
    import qdlm_export  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("qdlm_export is importable in the isolated process")
"""


def run_isolated(script: str, args: list[str], cwd: Path, **extra_env: str) -> str:
    """Run ``script`` in a fresh interpreter where qdlm_export cannot be imported."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_MODULES_CACHE=str(cwd / "modules"),
               OMP_NUM_THREADS="1")
    env.update(extra_env)
    env.pop("PYTHONPATH", None)
    path = cwd / "isolated.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "isolated-ok" in proc.stdout
    return proc.stdout


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
