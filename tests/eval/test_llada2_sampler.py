"""LLaDA2's block-diffusion sampler: the stand-in's ``generate`` against a reference written here from
the algorithm's description, its block-causal visibility while sampling, forward passes per generated
token (fewer with a lower confidence threshold), and ``qdlm-export eval`` on a quantized LLaDA2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import qdlm_export  # noqa: F401  (registers the quantizer)
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.eval.block_sampler import (
    ForwardCounter,
    block_generate,
    generated_length,
)
from qdlm_export.fixtures import EOS_ID, MASK_ID, build_tiny_moe_model
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.fidelity import prepare_folder_code

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    # bfloat16, as the published checkpoints ship: the published sampler's block mask is bfloat16
    return build_tiny_moe_model("llada2_moe", tmp_path_factory.mktemp("llada2") / "src", router_bias=True,
                                dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def model(source):
    """Float32 with eager attention: the bfloat16 0/-inf block mask adds exactly to float32 scores."""
    prepare_folder_code(source, "AutoModelForCausalLM")
    return transformers.AutoModelForCausalLM.from_pretrained(
        source, trust_remote_code=True, dtype=torch.float32, attn_implementation="eager").eval()


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 2000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the reference, written from the description of the published sampler ----------------------
def block_causal(n_tokens: int, block: int) -> torch.Tensor:
    """Additive mask: query i sees key j when j's block is not after i's block."""
    mask = torch.full((n_tokens, n_tokens), -math.inf)
    for i in range(n_tokens):
        for j in range(n_tokens):
            if j // block <= i // block:
                mask[i, j] = 0.0
    return mask[None, None]


def reference_generate(model, prompt, *, gen_length, block_length, steps, threshold, mask_id=MASK_ID, eos_id=EOS_ID):
    """Greedy block diffusion: (prompt + answer through the first EOS, forward passes)."""
    steps = min(steps, gen_length)  # minimal_topk = 1
    n_blocks = -(-(len(prompt) + gen_length) // block_length)
    seq = list(prompt) + [mask_id] * (n_blocks * block_length - len(prompt))
    per_step = [block_length // steps + (1 if s < block_length % steps else 0) for s in range(steps)]
    passes = 0
    for b in range(len(prompt) // block_length, n_blocks):
        lo, hi = b * block_length, (b + 1) * block_length
        for s in range(steps):
            masked = [i for i in range(lo, hi) if seq[i] == mask_id]
            if not masked:
                break
            with torch.no_grad():
                logits = model(torch.tensor([seq[:hi]]), attention_mask=block_causal(hi, block_length),
                               position_ids=torch.arange(hi)[None]).logits[0].double()
            passes += 1
            probs = logits.softmax(-1)
            best = probs.argmax(-1)
            conf = {i: float(probs[i, best[i]]) for i in masked}
            sure = [i for i in masked if conf[i] > threshold]
            chosen = sure if len(sure) >= per_step[s] else sorted(masked, key=lambda i: -conf[i])[: per_step[s]]
            for i in chosen:
                seq[i] = int(best[i])
        if eos_id in seq[len(prompt):hi]:
            break
    answer = seq[len(prompt): len(prompt) + gen_length]
    if eos_id in answer:
        answer = answer[: answer.index(eos_id) + 1]
    return list(prompt) + answer, passes


SETTINGS = [{"gen_length": 24, "block_length": 8, "steps": 4}, {"gen_length": 20, "block_length": 16, "steps": 5}]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("threshold", [1.0, 0.95, 0.0])
def test_generate_equals_the_reference(model, settings, threshold):
    prompt = _prompt(3, 11)
    with ForwardCounter(model) as counter:
        out = model.generate(inputs=torch.tensor([prompt]), threshold=threshold, mask_id=MASK_ID, eos_id=EOS_ID,
                             **settings)
    expected, passes = reference_generate(model, prompt, threshold=threshold, **settings)
    assert out[0].tolist() == expected
    assert counter.passes == passes


def test_sampling_is_block_causal(model):
    """Every forward of the sampler sees the blocks up to the current one under the block-causal mask:
    other tokens in the current block never change an earlier block's logits (they do without it)."""
    calls = []

    def keep(module, args, kwargs):
        calls.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0], kwargs["attention_mask"]))

    handle = model.model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model.generate(inputs=torch.tensor([_prompt(4, 8)]), gen_length=16, block_length=8, steps=2, threshold=1.0,
                       mask_id=MASK_ID, eos_id=EOS_ID)
    finally:
        handle.remove()
    assert len(calls) == 2 * 2  # the prompt's block is given, then two blocks of two steps each
    gen = torch.Generator().manual_seed(5)
    for ids, mask in calls:
        n = ids.shape[1]
        assert n % 8 == 0 and torch.equal(mask.float(), block_causal(n, 8))  # later blocks are not even given
        other = ids.clone()
        other[0, n - 8:] = torch.randint(3, 2000, (8,), generator=gen)
        with torch.no_grad():
            a, b = (model(x, attention_mask=mask, position_ids=torch.arange(n)[None]).logits[0] for x in (ids, other))
            full_a, full_b = (model(x).logits[0] for x in (ids, other))
        if n > 8:
            assert torch.allclose(a[: n - 8], b[: n - 8], atol=1e-5)
            assert (full_a[: n - 8] - full_b[: n - 8]).abs().max() > 1e-3  # what the mask prevents
        assert (a[n - 8:] - b[n - 8:]).abs().max() > 1e-3


def test_a_lower_threshold_needs_fewer_forward_passes(model):
    prompt = _prompt(6, 9)
    settings = {"gen_length": 23, "block_length": 8, "steps": 8}
    with torch.no_grad():  # a threshold inside the model's confidences: some masks pass it, some not
        first = model(torch.tensor([prompt + [MASK_ID] * 7]), attention_mask=block_causal(16, 8),
                      position_ids=torch.arange(16)[None]).logits[0, 9:].double().softmax(-1).max(-1).values
    middle = float(first.median())
    passes = {}
    for threshold in (1.0, middle, 0.0):
        with ForwardCounter(model) as counter:
            model.generate(inputs=torch.tensor([prompt]), threshold=threshold, mask_id=MASK_ID, eos_id=EOS_ID,
                           **settings)
        passes[threshold] = counter.passes
        assert counter.passes == reference_generate(model, prompt, threshold=threshold, **settings)[1]
    assert passes[0.0] == 3  # blocks [8,16), [16,24), [24,32): every mask accepted at its block's first step
    assert passes[1.0] == 7 + 8 + 8  # the schedule alone: one token per step (the prompt holds position 8)
    assert passes[0.0] < passes[middle] < passes[1.0]


def test_qdlm_lm_uses_the_models_sampler_and_counts_per_task(model, source):
    """The lm-eval model samples LLaDA2 with ``model.generate`` (the family's block length, the
    published defaults) and counts forward passes and generated tokens per task."""
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from qdlm_export.eval.lm_eval_model import QdlmLM

    tok = AutoTokenizer.from_pretrained(source)
    lm = QdlmLM(model=model, tokenizer=tok, mc_num=1, batch_size=1, threshold=0.0, gen_length=40)
    assert lm.sampler == "llada2"
    contexts = ["shutil.copymode\n\n", "heapq.merge\n\n", "os.path"]
    reqs = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 16}), i, ("task_a" if i < 2 else "task_b", i, 1))
            for i, c in enumerate(contexts)]
    texts = lm.generate_until(reqs, disable_tqdm=True)
    want = {"task_a": [0, 0], "task_b": [0, 0]}
    for req, text in zip(reqs, texts):
        prompt = tok(req.args[0])["input_ids"]
        ids, passes = reference_generate(model, prompt, gen_length=40, block_length=32, steps=32, threshold=0.0)
        answer = ids[len(prompt):]
        want[req.task_name][0] += passes
        want[req.task_name][1] += generated_length(answer, EOS_ID, MASK_ID)
        assert text == tok.decode([t for t in answer if t != EOS_ID], skip_special_tokens=True).split("\n")[0]
    assert lm.generation_counts == want


def test_block_generate_refuses_a_model_without_the_block_sampler(source):
    from qdlm_export.errors import ConfigError

    plain = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ConfigError, match="not a block-diffusion sampler"):
        block_generate(plain, [[3, 4]], gen_length=4, mask_id=1, eos_id=0, seed=0)


def test_eval_command_reports_forward_passes_per_token(source, tmp_path):
    quantized = tmp_path / "w4"
    quantize(str(source), quantized, make_config("rtn", bits=4, group_size=32),
             calibration=CalibrationConfig(nsamples=2, seqlen=32, seed=0), trust_remote_code=True, verify=False,
             device="cpu")
    exe = Path(sys.executable).with_name("qdlm-export")
    env = dict(os.environ, QDLM_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(
        [str(exe), "eval", str(quantized), "--trust-remote-code", "--tasks", "qdlm_stdlib_gen", "--limit", "2",
         "--no-nll", "--device", "cpu", "--json", "-O", "threshold=0.5", "-O", "block_length=8", "-O", "steps=4"],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = json.loads(proc.stdout)["table"]
    assert "qdlm_stdlib_gen/exact_match:first_three_words" in table
    row = table["qdlm_stdlib_gen/forward_passes_per_token"]
    assert row["higher_is_better"] is False
    for side in ("original", "quantized"):  # at most 4 passes per block of 8, at least one pass per block
        assert 0.1 <= row[side] <= 4.0, row
    report = json.loads((quantized / "qdlm_report.json").read_text())
    assert report["eval"]["qdlm_stdlib_gen/forward_passes_per_token"] == row


def test_sampler_options_are_checked_for_the_family():
    """LLaDA's sampler needs whole blocks; LLaDA2's own sampler takes any lengths; the new options have ranges."""
    from qdlm_export.errors import ConfigError
    from qdlm_export.eval.model_args import check_model_args

    lengths = {"gen_length": 48, "block_length": 32, "steps": 5}
    check_model_args(dict(lengths), block_diffusion=True)
    with pytest.raises(ConfigError, match="not a multiple of -O block_length"):
        check_model_args(dict(lengths))
    with pytest.raises(ConfigError, match="not a multiple of -O block_length"):
        check_model_args(dict(lengths, sampler="llada"), block_diffusion=True)
    check_model_args({"threshold": 1.0, "minimal_topk": 2, "eos_early_stop": True, "sampler": "llada2"})
    for bad, words in (({"threshold": 1.5}, "from 0 to 1"), ({"minimal_topk": 0}, ">= 1"),
                       ({"eos_early_stop": "yes"}, "true or false")):
        with pytest.raises(ConfigError) as info:
            check_model_args(bad)
        assert words in info.value.hint
