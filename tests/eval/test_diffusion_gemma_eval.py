"""``qdlm-export eval`` on DiffusionGemma (no mask token, uniform noise): generation runs transformers'
own canvas sampler with the checkpoint's generation config, forward passes are the decoder's denoising
steps, and likelihood tasks are refused before any model is loaded.

The "quantized" side is a copy of the tiny fixture whose decoder weights are perturbed, saved as a
plain transformers checkpoint (the eval entry points accept any checkpoint given ``original=``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
)

from qdlm_export.errors import ConfigError
from qdlm_export.eval.canvas_sampler import canvas_generate
from qdlm_export.eval.tasks import GEN_TASK, MC_TASK, tasks_dir
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = 16  # two canvases of 8
SEED = 1234  # evaluate_checkpoint's default seed, which the qdlm model samples with
LIMIT = 2
ROW = f"{GEN_TASK}/forward_passes_per_token"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "tiny-diffusion-gemma", seed=11,
                                      canvas_length=8)


@pytest.fixture(scope="module")
def perturbed(source, tmp_path_factory) -> Path:
    """The source with every decoder-layer weight moved by 5% of its spread: another checkpoint of the
    same files (config, generation config, tokenizer), as a quantized one would be."""
    out = tmp_path_factory.mktemp("dg-perturbed") / "perturbed"
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(99)
    for name, t in tensors.items():
        if name.startswith("model.decoder.layers.") and t.is_floating_point() and t.numel() > 1:
            tensors[name] = t + 0.05 * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _load(folder: Path):
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(source):
    return _load(source)


def _eos(folder: Path) -> set[int]:
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


def reference(model, folder: Path, prompt: list[int], *, max_new_tokens: int = MAX_NEW, seed: int = SEED):
    """transformers' generate, configured from generation_config.json read here, from ``seed``:
    (new tokens, decoder forward calls, transformers' own tokens_per_forward and its count of valid tokens)."""
    config = DiffusionGemmaGenerationConfig.from_pretrained(folder)
    calls = []
    handle = model.model.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        torch.manual_seed(seed)
        out = model.generate(input_ids=torch.tensor([prompt]), generation_config=config,
                             max_new_tokens=max_new_tokens)
    finally:
        handle.remove()
    new = out.sequences[0, len(prompt):]
    valid = int((new != config.pad_token_id).sum())
    return new.tolist(), len(calls), float(out.tokens_per_forward[0]), valid


def generated(answer: list[int], eos: set[int], max_new_tokens: int = MAX_NEW) -> int:
    """Tokens generated up to and including the first EOS, within max_new_tokens."""
    answer = answer[:max_new_tokens]
    return next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2000, (int(k),), generator=gen).tolist() for k in torch.randint(3, 12, (n,), generator=gen)]


# ---- the sampler is transformers' own -------------------------------------------------------------
def test_canvas_generate_is_the_models_generate_with_its_published_config(model, source):
    prompts = _prompts(2, seed=int(torch.randint(0, 2**31, (1,))))
    seed = int(torch.randint(0, 2**31, (1,)))
    before = torch.random.get_rng_state()
    answers = canvas_generate(model, prompts, max_new_tokens=MAX_NEW, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left as it was
    for prompt, answer in zip(prompts, answers):
        want, *_ = reference(model, source, prompt, seed=seed)
        assert answer == want and len(answer) == MAX_NEW
    # max_new_tokens is the one override: 12 tokens still sample two whole canvases, cut to 12
    short = canvas_generate(model, prompts[:1], max_new_tokens=12, seed=seed)[0]
    assert short == answers[0][:12]
    other = canvas_generate(model, prompts[:1], max_new_tokens=MAX_NEW, seed=seed + 1)[0]
    assert other != answers[0]  # the seed decides the random canvases


def test_forward_passes_are_decoder_denoising_steps(model, source):
    """The qdlm lm-eval model counts, per task, the decoder's forward calls (not the encoder's context
    pass) and the tokens up to and including EOS; both agree with transformers' own tokens_per_forward."""
    from lm_eval.api.instance import Instance

    from qdlm_export.eval.lm_eval_model import QdlmLM

    tok = AutoTokenizer.from_pretrained(source)
    lm = QdlmLM(model=model, tokenizer=tok, mc_num=1, batch_size=1, seed=SEED)
    assert lm.sampler == "canvas" and lm.mask_token_id is None
    contexts = ["shutil.copymode\n\n", "heapq.merge\n\n", "json.dumps\n\n"]
    reqs = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": MAX_NEW}), i,
                     ("task_a" if i < 2 else "task_b", i, 1)) for i, c in enumerate(contexts)]
    encoder_calls = []
    handle = model.model.encoder.language_model.layers[0].register_forward_pre_hook(lambda *a: encoder_calls.append(1))
    try:
        texts = lm.generate_until(reqs, disable_tqdm=True)
    finally:
        handle.remove()
    want = {"task_a": [0, 0], "task_b": [0, 0]}
    canvases = 0
    for req, text in zip(reqs, texts):
        prompt = tok(req.args[0])["input_ids"]
        answer, calls, tokens_per_forward, valid = reference(model, source, prompt)
        n = generated(answer, _eos(source))
        assert calls == round(valid / tokens_per_forward)  # our decoder count is transformers' count
        want[req.task_name][0] += calls
        want[req.task_name][1] += n
        canvases += -(-n // 8)
        cut = next((i for i, t in enumerate(answer) if t in _eos(source)), len(answer))  # the answer ends before EOS
        assert text == tok.decode(answer[:cut], skip_special_tokens=True).split("\n")[0]
    assert lm.generation_counts == want
    assert len(encoder_calls) == canvases  # one context pass per canvas, not counted as a forward pass
    total = want["task_a"][0] + want["task_b"][0]
    assert total < 48 * canvases  # the adaptive stop ended some canvas early: passes depend on the model


def test_an_eos_ends_the_answer_and_the_count(model, source, tmp_path):
    """A checkpoint whose generation config names a second EOS id (the published one also stops on
    <end_of_turn>): the sampler stops after the canvas holding it, pads the rest, and the answer and
    its generated tokens end at that EOS (included in the count, cut from the text)."""
    from lm_eval.api.instance import Instance

    from qdlm_export.eval.lm_eval_model import QdlmLM

    tok = AutoTokenizer.from_pretrained(source)
    prompt = tok("heapq.merge\n\n")["input_ids"]
    first, *_ = reference(model, source, prompt)
    at = next(i for i in range(2, 7) if first[i] not in first[:i])  # a token first seen inside canvas 1
    variant = tmp_path / "two-eos"
    shutil.copytree(source, variant)
    config = json.loads((variant / "generation_config.json").read_text())
    config["eos_token_id"] = [*config["eos_token_id"], first[at]]
    (variant / "generation_config.json").write_text(json.dumps(config))
    eos_model = _load(variant)
    lm = QdlmLM(model=eos_model, tokenizer=tok, mc_num=1, batch_size=1, seed=SEED)
    req = Instance("generate_until", {}, ("heapq.merge\n\n", {"until": [], "max_gen_toks": MAX_NEW}), 0, ("t", 0, 1))
    text = lm.generate_until([req], disable_tqdm=True)[0]
    answer, calls, tokens_per_forward, valid = reference(eos_model, variant, prompt)
    assert answer[: at + 1] == first[: at + 1]  # the EOS ids do not change the denoising
    assert answer[at + 1:] == [config["pad_token_id"]] * (8 - at - 1)  # one canvas, padded after EOS
    assert lm.generation_counts == {"t": [calls, at + 1]}
    assert valid == at + 1 and calls == round(valid / tokens_per_forward)
    assert text == tok.decode(first[:at], skip_special_tokens=True)


# ---- likelihood tasks are refused ------------------------------------------------------------------
def test_likelihood_tasks_are_refused_before_any_model_is_loaded(source, perturbed, monkeypatch):
    from qdlm_export.eval import evaluate, loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(loading, "load_model", no_loading)
    for tasks in (MC_TASK, f"{GEN_TASK},{MC_TASK}", "qdlm_offline"):
        with pytest.raises(ConfigError) as info:
            evaluate.evaluate_checkpoint(perturbed, tasks, original=str(source), limit=1, write=False, cache=False)
        assert f"task {MC_TASK} scores answers by their likelihood" in info.value.message
        assert "DiffusionGemma has no mask token" in info.value.message
        assert f"--tasks {GEN_TASK}" in info.value.hint
    with pytest.raises(ConfigError, match=f"task {MC_TASK} scores answers by their likelihood"):
        evaluate.evaluate_model(source, tasks=None, nll=False)  # one model: its default task is multiple choice
    with pytest.raises(ConfigError, match="-O steps: does not apply"):
        evaluate.evaluate_checkpoint(perturbed, GEN_TASK, original=str(source), model_args={"steps": 8}, write=False)
    with pytest.raises(ConfigError, match="sampler=llada does not fit"):
        evaluate.evaluate_checkpoint(perturbed, GEN_TASK, original=str(source), model_args={"sampler": "llada"},
                                     write=False)


def test_likelihood_tasks_are_found_in_groups_tags_and_patterns(model, source):
    from qdlm_export.eval.harness import (
        likelihood_tasks,
        refuse_likelihood_without_mask,
        run_tasks,
        task_manager,
    )

    manager = task_manager(["ai2_arc", "gsm8k"])  # lm-eval's own index: configs only, no data
    found = likelihood_tasks(manager, ["ai2_arc", "gsm8k", "wikitext", "mmlu", "arc_ea*"])
    assert {"arc_easy", "arc_challenge", "wikitext", "mmlu_anatomy"} <= set(found)
    assert "gsm8k" not in found and len([t for t in found if t.startswith("mmlu_")]) == 57
    assert likelihood_tasks(manager, ["gsm8k", GEN_TASK]) == []
    refuse_likelihood_without_mask(model, manager, ["gsm8k"])  # generation only: accepted
    tok = AutoTokenizer.from_pretrained(source)
    with pytest.raises(ConfigError, match="arc_challenge, arc_easy score answers by their likelihood"):
        refuse_likelihood_without_mask(model, manager, ["gsm8k", "ai2_arc"])
    with pytest.raises(ConfigError, match=f"task {MC_TASK} scores answers by their likelihood"):
        run_tasks(model, tok, ["qdlm_offline"], limit=1)  # a loaded model: refused before lm-eval runs


# ---- eval end to end -------------------------------------------------------------------------------
def _task_prompts(folder: Path, limit: int) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(folder)
    docs = [json.loads(line) for line in (tasks_dir() / "stdlib_gen.jsonl").read_text().splitlines()][:limit]
    return [tok(doc["title"] + "\n\n")["input_ids"] for doc in docs]


@pytest.fixture(scope="module")
def expected_passes_per_token(source, perturbed, model) -> dict[str, float]:
    """forward_passes_per_token of each side on the first LIMIT prompts of the bundled generation task,
    from transformers' generate and a count of the decoder's calls."""
    out = {}
    for side, folder, m in (("original", source, model), ("quantized", perturbed, _load(perturbed))):
        passes = tokens = 0
        for prompt in _task_prompts(folder, LIMIT):
            answer, calls, _, _ = reference(m, folder, prompt)
            passes += calls
            tokens += generated(answer, _eos(folder))
        out[side] = round(passes / tokens, 6)
    return out


def test_eval_runs_the_canvas_sampler_on_both_models(source, perturbed, expected_passes_per_token):
    from qdlm_export.eval.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(perturbed, GEN_TASK, original=str(source), limit=LIMIT, cache=False, device="cpu")
    row = result["table"][ROW]
    assert row["original"] == expected_passes_per_token["original"]
    assert row["quantized"] == expected_passes_per_token["quantized"]
    assert row["higher_is_better"] is False
    assert f"{GEN_TASK}/exact_match:first_three_words" in result["table"]
    assert "masked_token_nll" not in result["table"] and result["settings"]["nll"] is None  # no mask token
    published = json.loads((source / "generation_config.json").read_text())
    sampler = result["settings"]["sampler_config"]
    for key in ("max_denoising_steps", "t_min", "t_max", "confidence_threshold", "stability_threshold"):
        assert sampler[key] == published[key]
    assert sampler["sampler_config"]["entropy_bound"] == published["sampler_config"]["entropy_bound"]
    report = json.loads((perturbed / "qdlm_report.json").read_text())
    assert report["eval"][ROW] == row


def test_eval_command(source, perturbed, expected_passes_per_token, tmp_path):
    exe = Path(sys.executable).with_name("qdlm-export")
    env = dict(os.environ, QDLM_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    base = [str(exe), "eval", str(perturbed), "--original", str(source), "--device", "cpu", "--no-write"]
    refused = subprocess.run([*base, "--tasks", MC_TASK, "--json"], capture_output=True, text=True, timeout=300,
                             env=env, check=False)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert f"{MC_TASK} scores answers by their likelihood" in refused.stderr
    # no --tasks: the bundled task that applies to a model without a mask token, generation
    proc = subprocess.run([*base, "--limit", str(LIMIT), "--json"], capture_output=True,
                          text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = json.loads(proc.stdout)["table"]
    assert f"{GEN_TASK}/exact_match:first_three_words" in table and not any(k.startswith(MC_TASK) for k in table)
    row = table[ROW]
    assert row["original"] == expected_passes_per_token["original"]
    assert row["quantized"] == expected_passes_per_token["quantized"]
