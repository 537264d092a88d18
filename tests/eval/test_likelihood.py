"""Likelihood of masked diffusion LMs (qdlm_export.eval.likelihood) and the shipped trained models.

* The held-out masked-token NLL is deterministic for a seed, and the trained checkpoints score far
  better than the builder's random initialisation of the same shape (and than a unigram model).
* The Monte-Carlo log-likelihood (LLaDA's and Dream's estimators) matches, within Monte-Carlo error,
  its exact expectation enumerated over every masking in float64 on a short answer; with a
  context-free model the LLaDA estimate is exact.
* Dream's logit shift is honoured: tests that fail if it were ignored (or applied to LLaDA).
"""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from qdlm_export.eval.likelihood import (
    DREAM_EPS,
    corpus_split,
    heldout_tokens,
    llada_mask_counts,
    loglikelihood,
    loglikelihood_terms,
    masked_token_nll,
    masked_token_nll_per_ratio,
    split_corpus,
)
from qdlm_export.fixtures import MASK_ID, build_tiny_model, tokenizer_dir

ASSETS = tokenizer_dir().parent
SHIPPED = {"llada": ASSETS / "tiny-llada", "dream": ASSETS / "tiny-dream"}
SHIFT = {"llada": False, "dream": True}
VOCAB = 2048


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture(scope="module")
def windows(tok):
    return heldout_tokens(tok, 6, 128, seed=0)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return {f: AutoModel.from_pretrained(SHIPPED[f], trust_remote_code=True, dtype=torch.float32).eval()
            for f in SHIPPED}


def _nll(model, tokens, family, **kw):
    return masked_token_nll(model, tokens, mask_token_id=MASK_ID, logits_shift=SHIFT[family], **kw)


# --- the corpus split ----------------------------------------------------------------------------

def test_split_is_at_a_paragraph_boundary_near_the_end():
    from qdlm_export.quantize.calibration import load_text

    text = load_text("default")
    train, heldout = corpus_split()
    assert train + "\n\n" + heldout == text
    assert 0.04 <= len(heldout) / len(text) <= 0.06
    assert split_corpus("one\n\ntwo\n\nthree four five", 0.5) == ("one\n\ntwo", "three four five")


def test_training_runs_used_this_split():
    train, heldout = corpus_split()
    for folder in SHIPPED.values():
        data = json.loads((folder / "training.json").read_text())["data"]
        assert (data["train_chars"], data["heldout_chars"]) == (len(train), len(heldout))


def test_heldout_windows_come_from_the_tail(tok):
    from qdlm_export.quantize.calibration import tokenize_corpus

    tail = tokenize_corpus(tok, corpus_split()[1]).tolist()
    w = heldout_tokens(tok, 4, 32, seed=3)
    assert w.shape == (4, 32) and torch.equal(w, heldout_tokens(tok, 4, 32, seed=3))
    for row in w.tolist():
        assert any(tail[i : i + 32] == row for i in range(len(tail) - 31))
    assert not torch.equal(w, heldout_tokens(tok, 4, 32, seed=4))


# --- masked-token NLL ----------------------------------------------------------------------------

def test_nll_is_deterministic_and_independent_of_batch_size(trained, windows):
    model = trained["llada"]
    a = _nll(model, windows, "llada", seed=1, batch_size=4)
    assert a == _nll(model, windows, "llada", seed=1, batch_size=4)
    assert a == pytest.approx(_nll(model, windows, "llada", seed=1, batch_size=6), abs=1e-5)
    assert a != _nll(model, windows, "llada", seed=2, batch_size=4)


def test_mask_id_and_shift_default_to_the_family_adapters(trained, windows):
    for family, model in trained.items():
        assert masked_token_nll(model, windows[:2]) == _nll(model, windows[:2], family)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_trained_model_beats_random_init_and_unigram(trained, windows, family, tmp_path):
    record = json.loads((SHIPPED[family] / "training.json").read_text())
    sizes = record["sizes"]
    rand_dir = build_tiny_model(family, tmp_path / "rand", seed=record["seed"], hidden_size=sizes["hidden_size"],
                                intermediate_size=sizes["intermediate_size"], num_layers=sizes["num_layers"],
                                num_heads=sizes["num_heads"], num_kv_heads=sizes["num_kv_heads"])
    rand = AutoModel.from_pretrained(rand_dir, trust_remote_code=True, dtype=torch.float32).eval()
    got, baseline = _nll(trained[family], windows, family), _nll(rand, windows, family)
    assert got < 0.8 * baseline, (got, baseline)
    # A unigram model fitted to the training text scores train_unigram_cross_entropy on the held-out
    # text; a model that uses context must beat it clearly, and most where little is masked.
    assert got < record["train_unigram_cross_entropy"] - 0.5, (got, record["train_unigram_cross_entropy"])
    per_ratio = masked_token_nll_per_ratio(trained[family], windows, mask_token_id=MASK_ID, logits_shift=SHIFT[family])
    assert per_ratio[0.15] + 0.5 < per_ratio[0.9], per_ratio


def test_shift_is_honoured_by_the_nll(trained, windows):
    """Scoring Dream without its shift (or LLaDA with one) reads the wrong position's logits."""
    dream, llada = trained["dream"], trained["llada"]
    assert _nll(dream, windows[:3], "dream") + 1.0 < masked_token_nll(
        dream, windows[:3], mask_token_id=MASK_ID, logits_shift=False)
    assert _nll(llada, windows[:3], "llada") + 1.0 < masked_token_nll(
        llada, windows[:3], mask_token_id=MASK_ID, logits_shift=True)


# --- toy models ----------------------------------------------------------------------------------

class ContextFree(torch.nn.Module):
    """The same logits at every position, whatever the input: CE of a token never depends on the mask."""

    def __init__(self, seed=0):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed),
                                                   dtype=torch.float64) * 3)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, VOCAB))


class Oracle(torch.nn.Module):
    """Knows the clean sequence; the logits at position ``i + shift`` predict token ``i``... with
    ``shift=1`` (Dream's convention) position i - 1 holds token i's prediction."""

    def __init__(self, clean, shift):
        super().__init__()
        self.clean, self.shift = clean, shift
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, VOCAB)
        for i in range(n):
            src = i - self.shift
            if 0 <= src < n:
                logits[:, src, self.clean[i]] = 30.0
        return SimpleNamespace(logits=logits)


# --- Monte-Carlo log-likelihood ------------------------------------------------------------------

@pytest.mark.parametrize("answer_len", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8, 32])
def test_llada_mask_counts_are_stratified_and_exactly_uniform(answer_len, batch):
    table = torch.stack([llada_mask_counts(k, answer_len, batch) for k in range(1, answer_len + 1)])
    assert table.min() >= 1 and table.max() <= answer_len
    for j in range(batch):  # over k ~ U{1..L}, every copy's count is uniform on 1..L
        assert sorted(table[:, j].tolist()) == list(range(1, answer_len + 1))
    if batch == answer_len:  # one batch covers every count once
        assert sorted(table[0].tolist()) == list(range(1, answer_len + 1))


def test_llada_counts_match_upstream_away_from_ties():
    for k in range(1, 8):
        upstream = torch.round(torch.linspace(float(k), k + 31 * (7 / 32), steps=32)).long()
        upstream = ((upstream - 1) % 7) + 1
        ours = llada_mask_counts(k, 7, 32)
        ties = torch.tensor([(2 * j * 7) % (2 * 32) == 32 for j in range(32)])
        assert torch.equal(ours[~ties], upstream[~ties])


def _shifted(logits, shift):
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if shift else logits


@torch.no_grad()
def _exact_llada(model, prompt, answer, shift):
    """E[estimate] enumerated: l uniform on 1..L, then every l-subset equally likely, weight L/l."""
    seq, p, la = torch.tensor(prompt + answer), len(prompt), len(answer)
    total = 0.0
    for l in range(1, la + 1):
        subsets = list(itertools.combinations(range(p, p + la), l))
        noisy = seq.repeat(len(subsets), 1)
        for r, s in enumerate(subsets):
            noisy[r, list(s)] = MASK_ID
        logp = F.log_softmax(_shifted(model(input_ids=noisy).logits.double(), shift), -1)
        for r, s in enumerate(subsets):
            ce = -sum(logp[r, i, seq[i]].item() for i in s)
            total += ce * la / l / len(subsets) / la
    return total


@torch.no_grad()
def _exact_dream(model, prompt, answer, shift, eps=DREAM_EPS):
    """E over t ~ U(0,1), p = (1-eps) t + eps, of sum over Bernoulli(p) masks of sum CE / p; the
    first and last tokens of the sequence never masked. The t-integral is done in closed form."""
    seq = torch.tensor(prompt + answer)
    n = len(seq)
    maskable = [i for i in range(len(prompt), n) if 0 < i < n - 1]
    m = len(maskable)

    def weight(k):  # integral over t in [0,1] of p^(k-1) (1-p)^(m-k)
        a, c = k - 1, m - k
        return sum(math.comb(c, r) * (-1) ** r * (1 - eps ** (a + r + 1)) / (a + r + 1) for r in range(c + 1)) / (1 - eps)

    total = 0.0
    for k in range(1, m + 1):
        subsets = list(itertools.combinations(maskable, k))
        noisy = seq.repeat(len(subsets), 1)
        for r, s in enumerate(subsets):
            noisy[r, list(s)] = MASK_ID
        logp = F.log_softmax(_shifted(model(input_ids=noisy).logits.double(), shift), -1)
        for r, s in enumerate(subsets):
            total += weight(k) * -sum(logp[r, i, seq[i]].item() for i in s)
    return total


@pytest.fixture(scope="module")
def trained64():
    return {f: AutoModel.from_pretrained(SHIPPED[f], trust_remote_code=True, dtype=torch.float64).eval()
            for f in SHIPPED}


@pytest.mark.parametrize("estimator", ["llada", "dream"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_mc_estimate_matches_the_exact_expectation(trained64, tok, family, estimator):
    model, shift = trained64[family], SHIFT[family]
    prompt = tok("def split(self, text):\n", add_special_tokens=False)["input_ids"][:5]
    answer = tok("        return text", add_special_tokens=False)["input_ids"][:3]
    assert len(prompt) == 5 and len(answer) == 3
    exact = (_exact_llada if estimator == "llada" else _exact_dream)(model, prompt, answer, shift)
    kw = dict(mask_token_id=MASK_ID, logits_shift=shift, estimator=estimator)
    terms = loglikelihood_terms(model, prompt, answer, mc_num=4096, batch_size=256, seed=0, **kw)
    assert terms.shape == (4096,) and terms.dtype == torch.float64
    stderr = terms.std().item() / math.sqrt(terms.numel())  # iid bound; stratification only helps
    assert abs(terms.mean().item() - exact) < 4 * stderr + 1e-9, (terms.mean().item(), exact, stderr)
    # The public entry point is the same estimate, negated (a log-likelihood).
    small = dict(mc_num=64, batch_size=32, seed=5, **kw)
    assert loglikelihood(model, prompt, answer, **small) == -loglikelihood_terms(model, prompt, answer, **small).mean().item()


def test_llada_estimate_is_exact_for_a_context_free_model():
    """With CE independent of the mask and equal answer tokens, every copy scores l * c * L / l."""
    model = ContextFree()
    c = -F.log_softmax(model.bias, -1)[7].item()
    got = loglikelihood(model, [3, 4, 5], [7, 7, 7, 7], mc_num=8, batch_size=4, mask_token_id=MASK_ID,
                        logits_shift=False, estimator="llada", seed=0)
    assert got == pytest.approx(-4 * c, rel=1e-12)


def test_estimates_are_unbiased_for_a_context_free_model():
    """E[CE_i * 1(masked) / P(masked)] = CE_i: the estimate's mean is the sum of the answer's CEs
    (Dream: all but the last answer token, which it never masks)."""
    model = ContextFree(seed=1)
    ce = -F.log_softmax(model.bias, -1)
    prompt, answer = [3, 4], [10, 11, 12, 13]
    for estimator, scored in (("llada", answer), ("dream", answer[:-1])):
        terms = loglikelihood_terms(model, prompt, answer, mc_num=8192, batch_size=512, mask_token_id=MASK_ID,
                                    logits_shift=False, estimator=estimator, seed=0)
        want = sum(ce[t].item() for t in scored)
        assert abs(terms.mean().item() - want) < 4 * terms.std().item() / math.sqrt(terms.numel()), estimator


@pytest.mark.parametrize("estimator", ["llada", "dream"])
def test_shift_is_honoured_by_the_estimators(estimator):
    prompt, answer = [5, 6, 7], [8, 9, 10, 11, 12]
    clean = prompt + answer
    kw = dict(mc_num=32, batch_size=16, mask_token_id=MASK_ID, estimator=estimator, seed=0)
    dream_like, llada_like = Oracle(clean, shift=1), Oracle(clean, shift=0)
    assert loglikelihood(dream_like, prompt, answer, logits_shift=True, **kw) > -1e-3
    assert loglikelihood(dream_like, prompt, answer, logits_shift=False, **kw) < -10
    assert loglikelihood(llada_like, prompt, answer, logits_shift=False, **kw) > -1e-3
    assert loglikelihood(llada_like, prompt, answer, logits_shift=True, **kw) < -10
    tokens = torch.tensor([clean])
    assert masked_token_nll(dream_like, tokens, mask_token_id=MASK_ID, logits_shift=True) < 1e-3
    assert masked_token_nll(dream_like, tokens, mask_token_id=MASK_ID, logits_shift=False) > 10


def test_estimates_are_seeded_and_checked():
    model = ContextFree(seed=2)
    kw = dict(mask_token_id=MASK_ID, logits_shift=False)
    for est in ("llada", "dream"):
        a = loglikelihood(model, [3, 4], [10, 11, 12], mc_num=32, batch_size=8, estimator=est, seed=1, **kw)
        assert a == loglikelihood(model, [3, 4], [10, 11, 12], mc_num=32, batch_size=8, estimator=est, seed=1, **kw)
        assert a != loglikelihood(model, [3, 4], [10, 11, 12], mc_num=32, batch_size=8, estimator=est, seed=2, **kw)
    with pytest.raises(ValueError, match="multiple"):
        loglikelihood(model, [3], [4, 5], mc_num=10, batch_size=4, estimator="llada", **kw)
    with pytest.raises(ValueError, match="estimator"):
        loglikelihood(model, [3], [4, 5], estimator="ar", **kw)
    with pytest.raises(ValueError, match="mask token"):
        loglikelihood(model, [3], [MASK_ID, 5], **kw)
    # Dream's upstream runs one batch when mc_num < batch_size.
    terms = loglikelihood_terms(model, [3], [4, 5, 6], mc_num=4, batch_size=16, estimator="dream", **kw)
    assert terms.numel() == 16
