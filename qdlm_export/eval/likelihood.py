"""Likelihood of masked diffusion LMs (LLaDA, Dream), original and quantized alike.

* :func:`masked_token_nll` - the held-out masked-token NLL: mask a fixed fraction of each window's
  tokens, score the masked ones, average the cross-entropy (nats per masked token) over a fixed set
  of ratios. All masks come from one seeded generator, so two models (say an original and its
  quantized export) are scored on exactly the same inputs and the numbers compare directly.
* :func:`heldout_tokens` - windows of the held-out tail of the shipped corpus, the part that
  ``examples/train_tiny_dllm.py`` does not train on (:func:`split_corpus` is the one split both use).
* :func:`loglikelihood` - the Monte-Carlo estimate of ``log p(answer | prompt)`` the public
  evaluation harnesses use: LLaDA's (``eval_llada.py``: stratified masked counts ``l_j``, each masked
  token's cross-entropy weighted by ``L_a / l_j``) or Dream's (``dream_base.py``, ``log_type=ftb``:
  stratified times ``t_j = (u0 + j/b) mod 1``, Bernoulli masking of the answer with
  ``p = (1 - 1e-3) t + 1e-3``, cross-entropy weighted by ``1 / p``). Both average the negative
  ELBO over ``mc_num`` masked copies; the prompt is never masked.

Models are anything that maps ``input_ids`` to ``.logits`` (or a tuple whose first item is the
logits). ``logits_shift=True`` (Dream) means the logits at position ``i - 1`` predict token ``i``,
applied exactly like the public callers do (``cat([logits[:, :1], logits[:, :-1]], 1)``).
``mask_token_id`` / ``logits_shift`` left as ``None`` are read from the model's config through its
family adapter.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_RATIOS",
    "DREAM_EPS",
    "HELDOUT_FRACTION",
    "corpus_split",
    "heldout_tokens",
    "llada_mask_counts",
    "loglikelihood",
    "loglikelihood_terms",
    "masked_token_nll",
    "masked_token_nll_per_ratio",
    "split_corpus",
]

HELDOUT_FRACTION = 0.05  # the last 5 % of the shipped corpus (by characters) is never trained on
DEFAULT_RATIOS = (0.15, 0.3, 0.5, 0.7, 0.9)
DREAM_EPS = 1e-3  # Dream's sampling_eps: p = (1 - eps) t + eps


# ------------------------------------------------------------------------------ the corpus split
def split_corpus(text: str, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """``(train, heldout)``: the held-out part starts at the first paragraph boundary (a blank line)
    at or after ``len(text) * (1 - heldout_fraction)`` characters; ``train + "\\n\\n" + heldout``
    is ``text`` when a boundary exists."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    cut = int(len(text) * (1 - heldout_fraction))
    boundary = text.find("\n\n", cut)
    if boundary < 0:
        boundary = text.rfind("\n\n", 0, cut)
    if boundary <= 0:
        return text[:cut], text[cut:]
    return text[:boundary], text[boundary + 2:]


def corpus_split(heldout_fraction: float = HELDOUT_FRACTION, source: str = "default") -> tuple[str, str]:
    """:func:`split_corpus` of a calibration source (default: the corpus shipped with the package)."""
    from ..quantize.calibration import load_text

    return split_corpus(load_text(source), heldout_fraction)


def heldout_tokens(
    tokenizer: Any, n: int, seqlen: int, seed: int = 0, *, text: str | None = None
) -> torch.Tensor:
    """``[n, seqlen]`` token windows at seeded random offsets of the held-out tail of the shipped
    corpus (or of ``text``, when given: then ``text`` itself is the held-out text)."""
    from ..quantize.calibration import tokenize_corpus

    if text is None:
        text = corpus_split()[1]
    ids = tokenize_corpus(tokenizer, text)
    if ids.numel() < seqlen:
        raise ValueError(f"the held-out text has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


# ------------------------------------------------------------------------------ helpers
def _settings(model: Any, mask_token_id: int | None, logits_shift: bool | None) -> tuple[int, bool]:
    if mask_token_id is not None and logits_shift is not None:
        return int(mask_token_id), bool(logits_shift)
    from ..families import family_for_config

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("pass mask_token_id= and logits_shift= (the model has no config to read them from)")
    family = family_for_config(config)
    if mask_token_id is None:
        mask_token_id = family.mask_token_id(config)
        if mask_token_id is None:
            raise ValueError(f"the config of {family.name!r} names no mask token; pass mask_token_id=")
    if logits_shift is None:
        logits_shift = family.logits_shift
    return int(mask_token_id), bool(logits_shift)


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _masked_ce(model: Any, ids: torch.Tensor, mask: torch.Tensor, mask_token_id: int, logits_shift: bool) -> torch.Tensor:
    """Cross-entropy (float32, or float64 for a float64 model; nats) of every masked position of ``ids`` (row-major order), with the
    masked positions replaced by ``mask_token_id`` in the model's input."""
    noisy = torch.where(mask, torch.full_like(ids, mask_token_id), ids)
    out = model(input_ids=noisy)
    logits = out.logits if hasattr(out, "logits") else out[0]
    rows, cols = mask.nonzero(as_tuple=True)
    # Shifted logits: position i is predicted at i - 1, and position 0 by itself (the public callers'
    # cat([logits[:, :1], logits[:, :-1]])). Only the needed rows are gathered and upcast.
    src = (cols - 1).clamp(min=0) if logits_shift else cols
    picked = logits[rows, src]
    if picked.dtype != torch.float64:  # half-precision logits are upcast; float64 ones keep their precision
        picked = picked.float()
    return F.cross_entropy(picked, ids[rows, cols], reduction="none")


# ------------------------------------------------------------------------------ held-out NLL
def _ratio_mask(n: int, seqlen: int, ratio: float, gen: torch.Generator, logits_shift: bool) -> torch.Tensor:
    """Exactly ``round(ratio * m)`` (at least 1) uniformly chosen masked positions per row, where
    ``m`` is the number of maskable positions (all of them; all but the first under a shift, since
    the first token has no prediction of its own)."""
    first = 1 if logits_shift else 0
    m = seqlen - first
    if m < 1:
        raise ValueError(f"windows of {seqlen} tokens leave nothing to mask")
    k = min(m, max(1, round(ratio * m)))
    scores = torch.rand(n, m, generator=gen)
    chosen = scores.argsort(dim=1)[:, :k] + first
    mask = torch.zeros(n, seqlen, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask


@torch.no_grad()
def masked_token_nll_per_ratio(
    model: Any,
    tokens: torch.Tensor,
    *,
    mask_token_id: int | None = None,
    logits_shift: bool | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[float, float]:
    """``{ratio: mean cross-entropy per masked token (nats)}`` of :func:`masked_token_nll`."""
    mask_token_id, logits_shift = _settings(model, mask_token_id, logits_shift)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (n, seqlen), got shape {tuple(tokens.shape)}")
    if bool((tokens == mask_token_id).any()):
        raise ValueError("the tokens already contain the mask token")
    n, seqlen = tokens.shape
    gen = torch.Generator().manual_seed(seed)
    # Every mask is drawn before any forward pass, so the numbers do not depend on batch_size.
    masks = [_ratio_mask(n, seqlen, r, gen, logits_shift) for r in ratios]
    device = _device(model)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        out = {}
        for ratio, mask in zip(ratios, masks):
            total, count = 0.0, 0
            for s in range(0, n, batch_size):
                ids = tokens[s : s + batch_size].to(device)
                m = mask[s : s + batch_size].to(device)
                ce = _masked_ce(model, ids, m, mask_token_id, logits_shift)
                total += ce.double().sum().item()
                count += ce.numel()
            out[float(ratio)] = total / count
        return out
    finally:
        if was_training:
            model.train()


def masked_token_nll(
    model: Any,
    tokens: torch.Tensor,
    *,
    mask_token_id: int | None = None,
    logits_shift: bool | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    batch_size: int = 16,
) -> float:
    """Held-out masked-token NLL in nats: for each ratio ``r`` mask ``round(r * L)`` random positions
    of every window (never the first one under ``logits_shift``), score the masked tokens, take the
    mean cross-entropy per masked token; return the average over ``ratios``.

    Deterministic for a ``seed`` (the masks do not depend on the model or on ``batch_size``), so an
    original model and its quantized copy see the same masked inputs.
    """
    per_ratio = masked_token_nll_per_ratio(
        model, tokens, mask_token_id=mask_token_id, logits_shift=logits_shift, ratios=ratios, seed=seed,
        batch_size=batch_size,
    )
    return sum(per_ratio.values()) / len(per_ratio)


# ------------------------------------------------------------------------------ MC log-likelihood
def llada_mask_counts(k: int, answer_len: int, batch: int) -> torch.Tensor:
    """LLaDA's stratified masked counts ``l_j = ((k + round(j * L / b) - 1) mod L) + 1`` for the
    ``b`` copies of one batch (``k`` uniform in 1..L).

    Upstream computes ``round(linspace(k, k + (b - 1) L / b, b))`` with ``torch.round`` (ties to
    even), so when ``j * L / b`` ends in .5 the rounding depends on the parity of ``k`` and ``l_j``
    is not exactly uniform. Here ties always round up, so every ``l_j`` is exactly uniform on
    1..L and the estimator is unbiased; the counts otherwise equal upstream's.
    """
    j = torch.arange(batch, dtype=torch.long)
    offsets = (2 * j * answer_len + batch) // (2 * batch)  # round-half-up of j * L / b, exactly
    return ((k - 1 + offsets) % answer_len) + 1


def _llada_terms(model, seq, prompt_len, mc_num, batch_size, mask_token_id, logits_shift, gen):
    if mc_num % batch_size:
        raise ValueError(f"mc_num {mc_num} must be a multiple of batch_size {batch_size} (as upstream asserts)")
    la = seq.numel() - prompt_len
    device = _device(model)
    terms = []
    for _ in range(mc_num // batch_size):
        k = int(torch.randint(1, la + 1, (), generator=gen))
        counts = llada_mask_counts(k, la, batch_size)
        ranks = torch.rand(batch_size, la, generator=gen).argsort(dim=1).argsort(dim=1)
        answer_mask = ranks < counts[:, None]  # l_j uniformly chosen answer positions per copy
        mask = torch.cat([torch.zeros(batch_size, prompt_len, dtype=torch.bool), answer_mask], dim=1)
        ids = seq[None].expand(batch_size, -1)
        ce = _masked_ce(model, ids.to(device), mask.to(device), mask_token_id, logits_shift).double().cpu()
        weight = (la / counts.double()).repeat_interleave(answer_mask.sum(1))
        row = torch.zeros(batch_size, dtype=torch.float64).index_add_(0, mask.nonzero()[:, 0], ce * weight)
        terms.append(row)
    return torch.cat(terms)


def _dream_terms(model, seq, prompt_len, mc_num, batch_size, mask_token_id, logits_shift, gen, eps=DREAM_EPS):
    n = seq.numel()
    device = _device(model)
    terms = []
    for _ in range(max(mc_num // batch_size, 1)):
        u0 = torch.rand(1, generator=gen, dtype=torch.float64)
        t = (u0 + torch.arange(batch_size, dtype=torch.float64) / batch_size) % 1
        p = (1 - eps) * t + eps
        mask = torch.rand(batch_size, n, generator=gen, dtype=torch.float64) < p[:, None]
        mask[:, 0] = False  # upstream: "always unmask bos and eos" (the first and last tokens)
        mask[:, -1] = False
        mask[:, :prompt_len] = False  # ftb: only the answer is noised
        ids = seq[None].expand(batch_size, -1)
        row = torch.zeros(batch_size, dtype=torch.float64)
        if mask.any():
            ce = _masked_ce(model, ids.to(device), mask.to(device), mask_token_id, logits_shift).double().cpu()
            which = mask.nonzero()[:, 0]
            row.index_add_(0, which, ce / p[which])
        terms.append(row)
    return torch.cat(terms)


@torch.no_grad()
def loglikelihood_terms(
    model: Any,
    prompt_ids: Sequence[int] | torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    mask_token_id: int | None = None,
    logits_shift: bool | None = None,
    estimator: str = "llada",
    seed: int = 0,
) -> torch.Tensor:
    """The per-copy negative-ELBO terms (float64, one per masked copy) whose mean is
    ``-loglikelihood(...)``: useful for a standard error."""
    mask_token_id, logits_shift = _settings(model, mask_token_id, logits_shift)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    answer = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1)
    if answer.numel() == 0:
        raise ValueError("the answer is empty")
    if mc_num < 1 or batch_size < 1:
        raise ValueError("mc_num and batch_size must be positive")
    seq = torch.cat([prompt, answer])
    if bool((seq == mask_token_id).any()):
        raise ValueError("the prompt or answer already contains the mask token")
    gen = torch.Generator().manual_seed(seed)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        if estimator == "llada":
            if logits_shift and prompt.numel() == 0:
                raise ValueError("with shifted logits the first token has no prediction: give a non-empty prompt")
            return _llada_terms(model, seq, prompt.numel(), mc_num, batch_size, mask_token_id, logits_shift, gen)
        if estimator == "dream":
            return _dream_terms(model, seq, prompt.numel(), mc_num, batch_size, mask_token_id, logits_shift, gen)
        raise ValueError(f"estimator must be 'llada' or 'dream', got {estimator!r}")
    finally:
        if was_training:
            model.train()


def loglikelihood(
    model: Any,
    prompt_ids: Sequence[int] | torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    mask_token_id: int | None = None,
    logits_shift: bool | None = None,
    estimator: str = "llada",
    seed: int = 0,
) -> float:
    """Monte-Carlo estimate of ``log p(answer | prompt)`` (nats; a lower bound in expectation, the
    ELBO) with LLaDA's or Dream's estimator.

    ``estimator="llada"``: ``mc_num / batch_size`` batches (``mc_num`` must be a multiple); in each,
    ``k ~ U{1..L_a}``, copy ``j`` masks ``l_j`` (:func:`llada_mask_counts`) uniformly chosen answer
    tokens, and the estimate is ``-(1/mc_num) sum_copies sum_masked CE * L_a / l_j``.

    ``estimator="dream"``: ``max(mc_num // batch_size, 1)`` batches of ``batch_size`` copies; copy
    ``j`` has ``t_j = (u0 + j/b) mod 1``, ``p_j = (1 - 1e-3) t_j + 1e-3``, masks each answer token
    with probability ``p_j`` except the sequence's first and last tokens (upstream's "always unmask
    bos and eos": Dream's harness appends EOS to the answer, so the last answer token scored there is
    EOS; without one, the answer's own last token is not scored), and the estimate is
    ``-(1/copies) sum_copies sum_masked CE / p_j``.

    Deterministic for a ``seed``. MMLU-style single-sample runs use ``mc_num=1, batch_size=1``.
    """
    terms = loglikelihood_terms(
        model, prompt_ids, answer_ids, mc_num=mc_num, batch_size=batch_size, mask_token_id=mask_token_id,
        logits_shift=logits_shift, estimator=estimator, seed=seed,
    )
    return -float(terms.mean())
