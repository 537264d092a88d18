"""Run the real ``qdlm-export`` entry point in process (its error table included) and capture it."""

from __future__ import annotations

import sys

from qdlm_export.cli import app as cli


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``qdlm-export ARGS``."""
    monkeypatch.setattr(sys, "argv", ["qdlm-export", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
