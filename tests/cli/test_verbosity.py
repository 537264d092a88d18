"""-v/-q on every command: what reaches stderr, with stdout kept for results (cli/verbosity.py)."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_runner import run_cli

CONSOLE_SCRIPT = Path(sys.executable).with_name("qdlm-export")
SMALL = ("--nsamples", "4", "--seqlen", "32")


def run_console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(
    importlib.util.find_spec("torchao") is not None,
    reason="torchao (the optional `peers` extra) logs import-time warnings while transformers imports its "
    "quantizers, before the CLI has parsed -q",
)
def test_quiet_quantize_prints_nothing_on_stderr(tmp_path):
    done = run_console("quantize", "--out", str(tmp_path / "w4"), *SMALL, "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "relative output error" in done.stdout  # results still on stdout


def test_verbose_shows_library_info_and_json_stdout_parses(tmp_path):
    done = run_console("quantize", "--out", str(tmp_path / "w4"), *SMALL, "-v", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # nothing but the JSON on stdout
    assert summary["quantized_modules"] == 14
    for line in ("Opening", "Quantizing 2 blocks with rtn", "Verifying"):
        assert line in done.stderr, done.stderr
    # default verbosity: the library's INFO lines stay hidden
    quiet = run_console("quantize", "--out", str(tmp_path / "w4b"), *SMALL, "--no-verify", "--json", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "Quantizing 2 blocks" not in quiet.stderr
    json.loads(quiet.stdout)


def test_every_command_takes_verbose_and_quiet(monkeypatch, capsys):
    for command in ("quantize", "inspect", "push", "convert", "bench", "eval"):
        code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
        assert code == 0 and "--verbose" in out and "-v" in out and "--quiet" in out and "-q" in out, command
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0 and "--verbose" in out and "--quiet" in out


def test_levels_and_state_restored(monkeypatch, capsys, tmp_path):
    from qdlm_export.cli import verbosity

    before = (logging.getLogger().level, list(logging.getLogger().handlers), logging.getLogger("qdlm_export").level)
    with verbosity.restored_after_run():
        for args, library, root in (((0, True), logging.ERROR, logging.ERROR), ((0, False), logging.WARNING, logging.WARNING),
                                    ((1, False), logging.INFO, logging.INFO), ((2, False), logging.DEBUG, logging.INFO)):
            verbosity.configure(*args)
            assert logging.getLogger("qdlm_export").getEffectiveLevel() == library
            assert logging.getLogger().level == root
            assert (logging.getLogger("lm_eval").level == logging.ERROR) == (args[0] == 0)
            assert verbosity.progress_enabled() == (not args[1])
        verbosity.set_root(1, False)  # `qdlm-export -v CMD` and `CMD -v` add up
        assert verbosity.configure(1, False) == 2
    after = (logging.getLogger().level, list(logging.getLogger().handlers), logging.getLogger("qdlm_export").level)
    assert after == before and verbosity.verbosity() == 0
