"""Progress of the long steps: what the library reports (core/progress.py) during a real quantize and
convert, and the bars the command line draws from it (cli/progress_bars.py)."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import qdlm_export  # noqa: F401
from qdlm_export.cli import progress_bars as bars_module
from qdlm_export.cli import verbosity
from qdlm_export.core import progress
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.exports.convert import convert
from qdlm_export.quantize.api import make_config, quantize


def _steps(events):
    """step name -> the (done, total) its first run reported, in order (a step may run again, e.g.
    tokenizing the verification text after the calibration text)."""
    seen: dict[str, list[tuple[int, int]]] = {}
    finished: set[str] = set()
    for name, done, total in events:
        if name in finished:
            continue
        seen.setdefault(name, []).append((done, total))
        if len(seen[name]) > 1 and seen[name][-1] == seen[name][-2] == (total, total):
            finished.add(name)
    return seen


def test_a_step_reports_start_advances_and_end_even_on_error():
    events = []
    with progress.listening(lambda *e: events.append(e)):
        with progress.step("work", 3) as work:
            work.advance()
            work.advance(5)  # never past the total
        with pytest.raises(RuntimeError), progress.step("failing", 4) as failing:
            failing.advance()
            raise RuntimeError("stop")
    with progress.step("unheard", 2) as unheard:  # nobody listens any more
        unheard.advance()
    assert events == [("work", 0, 3), ("work", 1, 3), ("work", 3, 3), ("work", 3, 3),
                      ("failing", 0, 4), ("failing", 1, 4), ("failing", 4, 4)]


def test_quantize_and_convert_report_every_long_step(tiny_llada, tmp_path):
    events = []
    with progress.listening(lambda *e: events.append(e)):
        out = quantize(str(tiny_llada), tmp_path / "gptq", make_config("gptq", bits=4, group_size=32),
                       calibration=CalibrationConfig(nsamples=4, seqlen=32, seed=int(torch.randint(0, 999, ()))),
                       trust_remote_code=True, device="cpu").out
        convert(out, tmp_path / "ct", "compressed-tensors")
    steps = _steps(events)
    tokenizing = steps["tokenizing calibration text (characters)"]
    assert tokenizing[0][0] == 0 and tokenizing[-1][0] == tokenizing[-1][1] > 1000
    assert [d for d, _ in tokenizing] == sorted(d for d, _ in tokenizing)
    import json

    layers = json.loads((tiny_llada / "config.json").read_text())["n_layers"]
    assert steps["quantizing blocks"] == [(i, layers) for i in range(layers + 1)] + [(layers, layers)]
    original = steps["verifying: the original, block by block"]
    assert original[-1][0] == original[-1][1] and original[-1][1] % layers == 0
    assert steps["verifying: the quantized checkpoint (batches)"][-1][0] >= 1
    linears = len(json.loads((out / "config.json").read_text())["quantization_config"]["quantized_modules"])
    assert steps["converting to compressed-tensors: quantized linears"] == (
        [(i, linears) for i in range(linears + 1)] + [(linears, linears)])


def test_the_cli_draws_one_bar_per_step_and_nothing_when_quiet(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(bars_module, "err", Console(file=screen, force_terminal=True, width=100))
    monkeypatch.setitem(verbosity._state, "verbosity", 0)
    with bars_module.progress_bars():
        with progress.step("tokenizing calibration text (characters)", 10) as step:
            step.advance(4)
    drawn = screen.getvalue()
    assert "tokenizing calibration text" in drawn and "/10" in drawn and "-:--:--" in drawn  # count, ETA

    screen.truncate(0)
    monkeypatch.setitem(verbosity._state, "verbosity", -1)  # -q
    with bars_module.progress_bars():
        with progress.step("quantizing blocks", 3) as step:
            step.advance()
    assert screen.getvalue().strip("\x00") == ""
    with bars_module.progress_bars(disable=True):  # --json
        with progress.step("quantizing blocks", 3) as step:
            step.advance()
    assert screen.getvalue().strip("\x00") == ""
