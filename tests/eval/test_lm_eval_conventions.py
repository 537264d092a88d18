"""lm-eval conventions of ``eval``: ``--output-path``/``--log-samples`` files, the original model's
results cached between checkpoints of one original, and the stock lm-eval API as docs/EVAL.md shows
it. Offline: bundled tasks only, and the cache in a temporary folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from qdlm_export.eval import evaluate as evaluate_module  # noqa: E402
from qdlm_export.eval.tasks import MC_TASK  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "EVAL.md"


@pytest.fixture
def evaluated(monkeypatch, tmp_path):
    """The model folders evaluate_checkpoint evaluates (a spy around evaluate_model), with the cache
    in a temporary folder."""
    monkeypatch.setenv("QDLM_CACHE", str(tmp_path / "cache"))
    seen: list[str] = []
    real = evaluate_module.evaluate_model

    def spy(model, *args, **kwargs):
        seen.append(str(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_model", spy)
    return seen


@pytest.fixture(scope="module")
def two_checkpoints(tiny_llada, tmp_path_factory):
    from qdlm_export.quantize.api import make_config, quantize

    root = tmp_path_factory.mktemp("ckpts")
    for bits in (4, 3):
        quantize(str(tiny_llada), root / f"w{bits}", make_config("rtn", bits=bits, group_size=64),
                 trust_remote_code=True, verify=False)
    return root / "w4", root / "w3"


def _eval(monkeypatch, capsys, folder, *extra):
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(folder), "--trust-remote-code", "--tasks", MC_TASK,
                             "--limit", "3", "--mc-num", "4", "--no-nll", "--json", *extra)
    assert code == 0, err
    return json.loads(out), err


def test_second_checkpoint_reuses_the_originals_results(two_checkpoints, tiny_llada, evaluated, monkeypatch, capsys,
                                                        tmp_path):
    w4, w3 = two_checkpoints
    first, _ = _eval(monkeypatch, capsys, w4, "--output-path", str(tmp_path / "o4"), "--log-samples")
    assert evaluated == [str(tiny_llada), str(w4)] and first["original_cache"] == "stored"

    evaluated.clear()
    second, err = _eval(monkeypatch, capsys, w3, "--output-path", str(tmp_path / "o3"), "--log-samples")
    assert evaluated == [str(w3)]  # the original was not evaluated again
    assert second["original_cache"] == "reused" and "reused its cached results" in err
    rows = first["table"].keys()
    assert second["table"].keys() == rows
    assert {r: second["table"][r]["original"] for r in rows} == {r: first["table"][r]["original"] for r in rows}

    # lm-eval's own results JSON for each model, and its per-sample logs, also for the cached original
    for out, result in ((tmp_path / "o4", first), (tmp_path / "o3", second)):
        for model in ("original", "quantized"):
            res = json.loads((out / model / "results.json").read_text())
            assert res["results"][MC_TASK]["acc,none"] == pytest.approx(result["table"][f"{MC_TASK}/acc"][model])
            samples = [json.loads(x) for x in (out / model / f"samples_{MC_TASK}.jsonl").read_text().splitlines()]
            assert len(samples) == 3 and all("resps" in s and "doc" in s for s in samples)
        assert json.loads((out / "comparison.json").read_text())["table"] == result["table"]

    evaluated.clear()  # --no-cache evaluates the original again, with the same numbers (same seeds)
    third, err = _eval(monkeypatch, capsys, w3, "--no-cache", "--output-path", str(tmp_path / "o3"))
    assert evaluated == [str(tiny_llada), str(w3)] and third["original_cache"] is None
    assert third["table"] == second["table"]
    assert not (tmp_path / "o3" / "original" / f"samples_{MC_TASK}.jsonl").exists()  # the rerun's own files only


def test_a_changed_setting_is_a_new_cache_entry(two_checkpoints, tiny_llada, evaluated, monkeypatch, capsys):
    w4, _ = two_checkpoints
    _eval(monkeypatch, capsys, w4)
    evaluated.clear()
    again, _ = _eval(monkeypatch, capsys, w4, "--seed", "7")
    assert evaluated == [str(tiny_llada), str(w4)] and again["original_cache"] == "stored"


def test_output_path_and_log_samples_are_refused_before_any_work(two_checkpoints, evaluated, monkeypatch, capsys,
                                                                 tmp_path):
    w4, _ = two_checkpoints
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(w4), "--trust-remote-code", "--log-samples")
    assert code == 2 and "--output-path" in err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(w4), "--trust-remote-code", "--output-path", str(mine))
    assert code != 0 and "not written by `qdlm-export eval`" in err and "Traceback" not in err
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert evaluated == []


def _python_api_snippet() -> str:
    text = DOCS.read_text()
    section = text.split("## The stock lm-eval way", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_lm_eval_python_api_runs(monkeypatch, capsys, tmp_path):
    """docs/EVAL.md's `lm_eval.simple_evaluate(model="qdlm", ...)` snippet on the embedded default,
    quantized as the docs' quick start does, with a tiny limit."""
    from qdlm_export.eval.offline import offline_mode

    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--out", "w4", "--no-verify", "--json")
    assert code == 0, err
    snippet = _python_api_snippet()
    assert 'model="qdlm"' in snippet and "import qdlm_export.eval.lm_eval_model" in snippet
    tiny = snippet.replace("limit=20", "limit=2").replace("mc_num=32,batch_size=32", "mc_num=4,batch_size=4")
    assert tiny != snippet
    scope: dict = {}
    with offline_mode():
        exec(compile(tiny, str(DOCS), "exec"), scope)  # noqa: S102 - the documented snippet itself
    res = scope["results"]["results"][MC_TASK]
    assert 0.0 <= res["acc,none"] <= 1.0 and res["sample_len"] == 2
