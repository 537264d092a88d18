"""lm-eval runs offline with the ``qdlm`` model on the bundled tasks, and ``evaluate_checkpoint``
fills the report and the card. Sockets are closed for the whole module: nothing may reach a network."""

from __future__ import annotations

import json
import math
import socket

import pytest

pytest.importorskip("lm_eval")

import qdlm_export  # noqa: E402,F401
from qdlm_export.eval.lm_eval_model import QdlmLM  # noqa: E402  (registers "qdlm")
from qdlm_export.eval.offline import set_offline  # noqa: E402
from qdlm_export.eval.tasks import GEN_TASK, MC_TASK, tasks_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def no_network():
    set_offline()
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


def _manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), include_defaults=False)


class _Req:
    def __init__(self, *args):
        self.args = args


def test_bundled_data_is_well_formed():
    mc = [json.loads(x) for x in (tasks_dir() / "stdlib_mc.jsonl").read_text().splitlines()]
    gen = [json.loads(x) for x in (tasks_dir() / "stdlib_gen.jsonl").read_text().splitlines()]
    assert 30 <= len(mc) <= 60 and 30 <= len(gen) <= 60
    for row in mc:
        assert len(row["choices"]) == 4 and row["choices"][row["label"]] == row["answer"]
    for row in gen:
        assert len(row["answer"].split()) == 3


def test_simple_evaluate_runs_both_bundled_tasks_offline(tiny_llada):
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="qdlm",
        model_args={"pretrained": str(tiny_llada), "mc_num": 4, "batch_size": 4, "gen_length": 8, "steps": 4},
        tasks=[MC_TASK, GEN_TASK], task_manager=_manager(), limit=3, bootstrap_iters=0,
    )
    res = out["results"]
    assert 0.0 <= res[MC_TASK]["acc,none"] <= 1.0
    assert 0.0 <= res[MC_TASK]["acc_norm,none"] <= 1.0
    assert 0.0 <= res[GEN_TASK]["exact_match,first_three_words"] <= 1.0
    assert res[MC_TASK]["sample_len"] == 3
    gens = [s["resps"][0][0] for s in out["samples"][GEN_TASK]]
    assert all(isinstance(g, str) and "\n" not in g for g in gens)  # the stop sequence was applied


@pytest.fixture(scope="module")
def dream_lm(tiny_dream):
    from transformers import AutoTokenizer

    from qdlm_export.eval.loading import load_model

    model = load_model(tiny_dream, dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_dream, trust_remote_code=True)
    return QdlmLM(model=model, tokenizer=tok, mc_num=4, batch_size=4, gen_length=8, steps=4)


def test_dream_loglikelihood_is_dreams_estimator_with_eos(dream_lm):
    from qdlm_export.eval.likelihood import loglikelihood

    assert dream_lm.estimator == "dream" and dream_lm.sampler == "dream" and dream_lm.logits_shift
    [(lp, greedy)] = dream_lm.loglikelihood([_Req("argparse.", "ArgumentParser")])
    prompt, answer = dream_lm._encode_pair("argparse.", "ArgumentParser")
    want = loglikelihood(
        dream_lm.model, prompt, answer + [dream_lm.eos_token_id], mc_num=4, batch_size=4,
        estimator="dream", logits_shift=True, mask_token_id=dream_lm.mask_token_id, seed=dream_lm.seed,
    )
    assert lp == pytest.approx(want) and lp < 0 and greedy is False


def test_dream_generate_until_cuts_at_stop_sequences_and_keeps_order(dream_lm):
    reqs = [_Req("shutil.copy\n\n", {"until": ["e"], "max_gen_toks": 8}),
            _Req("hmac", {"until": [], "max_gen_toks": 8}),
            _Req("queue.Queue\n\n", {"until": ["e"], "max_gen_toks": 8})]
    outs = dream_lm.generate_until(reqs)
    assert len(outs) == 3 and "e" not in outs[0] and "e" not in outs[2]
    raw = dream_lm._generate_ids([dream_lm._encode("hmac")], gen_length=8, steps=4, block_length=8, temperature=0.0)[0]
    assert outs[1] == dream_lm.tokenizer.decode(raw, skip_special_tokens=True)


def test_loglikelihood_rolling_is_a_finite_bound(dream_lm):
    [lp] = dream_lm.loglikelihood_rolling([_Req("Return the docstring of a node.")])
    assert math.isfinite(lp) and lp < 0


def test_evaluate_checkpoint_fills_report_and_card(tiny_llada, tmp_path):
    from qdlm_export.eval.evaluate import evaluate_checkpoint
    from qdlm_export.quantize.api import make_config, quantize

    out = tmp_path / "rtn"
    quantize(str(tiny_llada), out, make_config("rtn", bits=4, group_size=64), trust_remote_code=True, verify=False)
    result = evaluate_checkpoint(out, [MC_TASK], limit=4, mc_num=4, nll_windows=4, nll_seqlen=32, trust_remote_code=True)
    table = result["table"]
    assert set(table) == {f"{MC_TASK}/acc", f"{MC_TASK}/acc_norm", "masked_token_nll"}
    nll = table["masked_token_nll"]
    assert nll["difference"] == pytest.approx(nll["quantized"] - nll["original"], abs=1e-5)
    assert nll["higher_is_better"] is False and nll["original"] > 0
    assert result["original"] == str(tiny_llada) and result["card"] == "regenerated"

    report = json.loads((out / "qdlm_report.json").read_text())
    assert report["eval"] == table and report["eval_settings"]["limit"] == 4
    card = (out / "README.md").read_text()
    assert f"| {MC_TASK}/acc |" in card and "| masked_token_nll |" in card

    (out / "README.md").write_text(card + "\nMy own notes.\n")  # an edited card is left alone
    again = evaluate_checkpoint(out, [MC_TASK], limit=2, mc_num=4, nll=False, trust_remote_code=True)
    assert again["card"] == "kept" and (out / "README.md").read_text().endswith("My own notes.\n")
    assert json.loads((out / "qdlm_report.json").read_text())["eval_settings"]["limit"] == 2


def test_offline_mode_restores_the_environment(monkeypatch):
    import os

    from qdlm_export.eval.offline import offline_mode

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with offline_mode():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "HF_DATASETS_OFFLINE" not in os.environ


def test_eval_command_on_the_embedded_default(monkeypatch, capsys, tmp_path):
    """`qdlm-export quantize` then `qdlm-export eval` on the embedded default, offline: the JSON table
    has both models' scores, its differences are quantized - original, and the folder keeps it."""
    from tests.cli_runner import run_cli

    def run(*args):
        return run_cli(monkeypatch, capsys, *args)

    out = tmp_path / "w3"
    code, _, err = run("quantize", "--out", str(out), "--bits", "3", "--no-verify", "--json")
    assert code == 0, err
    code, stdout, err = run("eval", str(out), "--trust-remote-code", "--tasks", MC_TASK, "--limit", "3", "--mc-num", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    table = result["table"]
    assert {f"{MC_TASK}/acc", "masked_token_nll"} <= set(table)
    for row in table.values():
        assert row["difference"] == pytest.approx(row["quantized"] - row["original"], abs=1e-6)
    assert result["original"].endswith("tiny-llada")
    assert json.loads((out / "qdlm_report.json").read_text())["eval"] == table

    code, _, err = run("eval", str(tmp_path / "missing"), "--limit", "2")
    assert code != 0 and "missing does not exist" in err and "Traceback" not in err
    code, _, err = run("eval", str(out), "--trust-remote-code", "--tasks", " , ")
    assert code != 0 and "no tasks" in err
