"""Diffusion sampling (qdlm_export.eval.generation) on the tiny LLaDA and Dream fixtures."""

from __future__ import annotations

import pytest
import torch

import qdlm_export  # noqa: F401
from qdlm_export.eval.generation import (
    dllm_settings,
    dream_generate,
    generate,
    llada_generate,
    num_transfer_tokens,
)
from qdlm_export.fixtures import MASK_ID

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = torch.tensor([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]])


def _load(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llada(tiny_llada):
    return _load(tiny_llada)


@pytest.fixture(scope="module")
def dream(tiny_dream):
    return _load(tiny_dream)


class Recorder(torch.nn.Module):
    """Wraps a model and keeps every (input, logits) pair it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, **kw):
        out = self.model(input_ids, **kw)
        self.calls.append((input_ids.clone(), out.logits.detach().clone()))
        return out


def _states(fn, *args, **kwargs):
    states = []
    out = fn(*args, callback=lambda step, x: states.append(x), **kwargs)
    return out, states


# ----------------------------------------------------------------------------------- schedule
def test_num_transfer_tokens_splits_evenly_with_remainder_first():
    sched = num_transfer_tokens(torch.tensor([8, 9, 2]), 3)
    assert sched.tolist() == [[3, 3, 2], [3, 3, 3], [1, 1, 0]]
    assert sched.sum(1).tolist() == [8, 9, 2]


def test_dllm_settings_from_the_family(llada, dream):
    assert dllm_settings(llada) == (MASK_ID, False)
    assert dllm_settings(dream) == (MASK_ID, True)


# ----------------------------------------------------------------------------------- LLaDA
@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("random", 0.0), ("low_confidence", 0.7)])
def test_llada_fills_every_mask_block_by_block_on_schedule(llada, remasking, temperature):
    gen_length, block_length, steps = 12, 4, 9  # 3 blocks of 4 tokens, 3 steps each: 2, 1, 1
    out, states = _states(
        llada_generate, llada, PROMPT, steps=steps, gen_length=gen_length, block_length=block_length,
        temperature=temperature, remasking=remasking, mask_token_id=MASK_ID, seed=3,
    )
    plen = PROMPT.shape[1]
    assert out.shape == (2, plen + gen_length)
    assert torch.equal(out[:, :plen], PROMPT)
    assert not (out == MASK_ID).any()
    assert len(states) == steps
    expected = num_transfer_tokens(torch.tensor([block_length]), steps // 3)[0].tolist() * 3
    prev = torch.cat([PROMPT, torch.full((2, gen_length), MASK_ID)], 1)
    for i, x in enumerate(states):
        revealed = (prev == MASK_ID) & (x != MASK_ID)
        assert revealed.sum(1).tolist() == [expected[i]] * 2, f"step {i}"
        assert torch.equal(x[prev != MASK_ID], prev[prev != MASK_ID])  # nothing is remasked
        blocks = (x[:, plen:] == MASK_ID).reshape(2, 3, block_length).any(-1)  # (batch, block): still masked
        for b in range(2):
            # a later block has unmasked tokens only if every earlier block is complete
            started = (x[:, plen + (b + 1) * block_length: plen + (b + 2) * block_length] != MASK_ID).any(1)
            assert not (started & blocks[:, b]).any(), f"block {b + 1} started before block {b} finished (step {i})"
        prev = x


def test_llada_temperature_zero_low_confidence_takes_argmax_of_most_confident(llada):
    rec = Recorder(llada)
    out, states = _states(
        llada_generate, rec, PROMPT, steps=4, gen_length=8, block_length=8, mask_token_id=MASK_ID,
    )
    assert len(rec.calls) == 4
    for (inp, logits), x in zip(rec.calls, states):
        was_mask = inp == MASK_ID
        new = was_mask & (x != MASK_ID)
        assert torch.equal(x[new], logits.argmax(-1)[new])
        probs = logits.float().softmax(-1)
        conf = probs.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
        for j in range(x.shape[0]):
            chosen = conf[j][new[j]]
            left = conf[j][was_mask[j] & ~new[j]]
            if left.numel():
                assert chosen.min() >= left.max()  # the most confident masks were revealed


def test_llada_is_deterministic_and_seeded(llada):
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=1.0, mask_token_id=MASK_ID)
    a = llada_generate(llada, PROMPT, seed=1, **kw)
    b = llada_generate(llada, PROMPT, seed=1, **kw)
    c = llada_generate(llada, PROMPT, seed=2, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_llada_cfg_runs_the_unconditional_pass_and_changes_the_result(llada):
    rec = Recorder(llada)
    kw = dict(steps=16, gen_length=16, block_length=16, mask_token_id=MASK_ID)
    plain = llada_generate(llada, PROMPT, **kw)
    guided = llada_generate(rec, PROMPT, cfg_scale=2.0, **kw)
    assert not (guided == MASK_ID).any()
    inp = rec.calls[0][0]
    assert inp.shape[0] == 2 * PROMPT.shape[0]  # conditional and prompt-masked rows in one pass
    assert (inp[2:, : PROMPT.shape[1]] == MASK_ID).all()
    assert not torch.equal(plain, guided)


def test_llada_left_padded_batch_matches_single_prompts(llada):
    short, long_ = [7, 8, 9], [20, 21, 22, 23, 24, 25]
    batch = torch.tensor([[2, 2, 2] + short, long_])
    am = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    kw = dict(steps=4, gen_length=8, block_length=4, mask_token_id=MASK_ID)
    both = llada_generate(llada, batch, attention_mask=am, **kw)
    one = llada_generate(llada, torch.tensor([short]), **kw)
    two = llada_generate(llada, torch.tensor([long_]), **kw)
    assert torch.equal(both[0, 6:], one[0, 3:])
    assert torch.equal(both[1, 6:], two[0, 6:])


def test_llada_rejects_bad_block_settings(llada):
    with pytest.raises(ValueError, match="multiple of block_length"):
        llada_generate(llada, PROMPT, steps=4, gen_length=10, block_length=4, mask_token_id=MASK_ID)
    with pytest.raises(ValueError, match="number of blocks"):
        llada_generate(llada, PROMPT, steps=5, gen_length=8, block_length=4, mask_token_id=MASK_ID)


# ----------------------------------------------------------------------------------- Dream
@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_dream_every_alg_fills_every_mask(dream, alg, temperature):
    out = dream_generate(
        dream, PROMPT, steps=6, max_new_tokens=10, alg=alg, temperature=temperature, top_p=0.9, top_k=50,
        mask_token_id=MASK_ID, seed=0,
    )
    assert out.shape == (2, PROMPT.shape[1] + 10)
    assert torch.equal(out[:, : PROMPT.shape[1]], PROMPT)
    assert not (out == MASK_ID).any()


@pytest.mark.parametrize("alg_temp", [None, 0.5])
def test_dream_confidence_algs_follow_the_time_schedule(dream, alg_temp):
    steps, n, eps = 5, 12, 1e-3
    out, states = _states(
        dream_generate, dream, PROMPT, steps=steps, max_new_tokens=n, alg="entropy", alg_temp=alg_temp,
        eps=eps, mask_token_id=MASK_ID, seed=0,
    )
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    masked = n
    prev = torch.cat([PROMPT, torch.full((2, n), MASK_ID)], 1)
    for i, x in enumerate(states):
        t, s = float(ts[i]), float(ts[i + 1])
        want = masked if i == steps - 1 else int(masked * (1 - s / t))
        got = ((prev == MASK_ID) & (x != MASK_ID)).sum(1).tolist()
        assert got == [want, want], f"step {i}"
        masked -= want
        prev = x
    assert not (out == MASK_ID).any()


def test_dream_greedy_maskgit_reveals_argmax_of_shifted_logits(dream):
    rec = Recorder(dream)
    out, states = _states(
        dream_generate, rec, PROMPT, steps=4, max_new_tokens=8, alg="maskgit_plus", mask_token_id=MASK_ID,
    )
    for (inp, logits), x in zip(rec.calls, states):
        shifted = torch.cat([logits[:, :1], logits[:, :-1]], 1)  # logits at i-1 predict token i
        new = (inp == MASK_ID) & (x != MASK_ID)
        assert torch.equal(x[new], shifted.argmax(-1)[new])


def test_dream_origin_is_seeded(dream):
    kw = dict(steps=8, max_new_tokens=8, alg="origin", temperature=1.0, mask_token_id=MASK_ID)
    assert torch.equal(dream_generate(dream, PROMPT, seed=5, **kw), dream_generate(dream, PROMPT, seed=5, **kw))
    assert not torch.equal(dream_generate(dream, PROMPT, seed=5, **kw), dream_generate(dream, PROMPT, seed=6, **kw))


# ----------------------------------------------------------------------------------- front
def test_generate_picks_the_sampler_of_the_family(llada, dream):
    a = generate(llada, PROMPT[:1], gen_length=8, steps=4)
    assert torch.equal(a, llada_generate(llada, PROMPT[:1], steps=4, gen_length=8, block_length=8, mask_token_id=MASK_ID))
    b = generate(dream, PROMPT[:1], gen_length=8, steps=4, alg="entropy")
    assert torch.equal(b, dream_generate(dream, PROMPT[:1], steps=4, max_new_tokens=8, alg="entropy", mask_token_id=MASK_ID))
    c = generate(dream, PROMPT[:1], gen_length=8, steps=4, sampler="llada")  # LLaDA's sampler, shifted logits
    assert not (c == MASK_ID).any()
