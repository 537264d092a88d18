"""Text generation for masked diffusion LMs: LLaDA's block-wise remasking sampler and Dream's sampler.

Both start from ``[prompt, MASK * n]`` and replace masks with predicted tokens over a fixed number of
denoising steps (the algorithms are described in docs/EVAL.md). They work on any model that maps
``input_ids`` (and optionally a 2-D padding ``attention_mask``) to ``.logits``: original checkpoints
and quantized ones alike.

* :func:`llada_generate` - LLaDA: the answer is split into blocks filled left to right; inside a
  block each step reveals a fixed number of tokens, the most confident ones (``low_confidence``) or
  random ones (``random``). Optional classifier-free guidance (``cfg_scale``).
* :func:`dream_generate` - Dream: a time schedule ``t = 1 -> eps``; ``origin`` reveals each mask with
  probability ``1 - s/t``, the other algorithms reveal the ``#mask * (1 - s/t)`` most confident
  masks (max probability, top-1 minus top-2 margin, or negative entropy).
* :func:`generate` - picks one of the two by model family.

All randomness comes from one ``torch.Generator`` (``seed`` or ``generator=``), so a call is
reproducible. Prompts of a batch either have the same length or come left-padded with an
``attention_mask`` (1 = real token); the returned tensor holds the prompt and the generated tokens.
Padding never changes a row's result: models whose forward takes ``position_ids`` (Dream) get the 4-D
boolean mask and shifted positions their published code needs (:func:`padding_inputs`); the others
(LLaDA, whose published forward ignores the mask) generate the rows of a padded batch one at a time.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = [
    "dllm_settings",
    "dream_generate",
    "generate",
    "llada_generate",
    "num_transfer_tokens",
]

StepCallback = Callable[[int, torch.Tensor], None]


# ----------------------------------------------------------------------------------- helpers
def dllm_settings(model_or_config: Any) -> tuple[int, bool]:
    """``(mask_token_id, logits_shift)`` of a model (or its config).

    Read from ``quantization_config.dllm`` when present (quantized checkpoints record it), else from
    the family adapter of ``config.model_type``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    dllm = (qc or {}).get("dllm") if isinstance(qc, dict) else None
    from ..families import family_for_config

    family = family_for_config(config)
    mask = dllm.get("mask_token_id") if isinstance(dllm, dict) else None
    shift = dllm.get("logits_shift") if isinstance(dllm, dict) else None
    if mask is None:
        mask = family.mask_token_id(config)
    if shift is None:
        shift = family.logits_shift
    if mask is None:
        raise ValueError(f"the config of model_type {family.name!r} names no mask token; pass mask_token_id=")
    return int(mask), bool(shift)


def _as_batch(prompt_ids: Any, attention_mask: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise ValueError(f"prompt_ids must be (seq,) or (batch, seq), got shape {tuple(x.shape)}")
    am = None
    if attention_mask is not None:
        am = torch.as_tensor(attention_mask, device=device).long()
        if am.dim() == 1:
            am = am[None]
        if am.shape != x.shape:
            raise ValueError(f"attention_mask {tuple(am.shape)} does not match prompt_ids {tuple(x.shape)}")
        if bool(am.all()):
            am = None  # no padding: run unmasked, exactly like an unbatched call
    return x, am


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _takes_positions(model) -> bool:
    """Whether the model's forward takes ``position_ids`` (Dream's does; LLaDA's published one does not)."""
    import inspect

    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def padding_inputs(attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 2-D 0/1 padding mask as what Dream's published forward needs: a 4-D boolean mask (True =
    attend; padded queries and keys both blanked, as Dream's own sampler builds it) and position ids
    that skip the padding, so every row computes what it computes alone."""
    keep = attention_mask.to(torch.bool)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(~keep, 1)
    return {"attention_mask": keep[:, None, None, :] & keep[:, None, :, None], "position_ids": positions}


def mask_inputs(model, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The keyword arguments that carry a 2-D padding mask into ``model``'s forward; built once per
    generation, since the mask does not change between denoising steps."""
    if attention_mask is None:
        return {}
    if _takes_positions(model):
        return padding_inputs(attention_mask)
    return {"attention_mask": attention_mask}


def _logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None, logits_shift: bool) -> torch.Tensor:
    return _step_logits(model, x, mask_inputs(model, attention_mask), logits_shift)


def _step_logits(model, x: torch.Tensor, inputs: dict[str, torch.Tensor], logits_shift: bool) -> torch.Tensor:
    out = model(x, **inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits_shift:  # logits at i-1 predict token i: move them onto position i
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


def _full_mask(attention_mask: torch.Tensor | None, n_new: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    return torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], n_new)], dim=1)


def _generator(generator: torch.Generator | None, seed: int | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def num_transfer_tokens(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many masks each step reveals: ``n // steps`` each, the remainder going to the first steps.

    ``n_masked`` has shape (batch,); the result (batch, steps) sums to ``n_masked`` row by row.
    """
    n = n_masked.long().reshape(-1, 1)
    base = n // steps
    rem = n % steps
    idx = torch.arange(steps, device=n.device)[None]
    return base + (idx < rem).long()


# ----------------------------------------------------------------------------------- LLaDA
@torch.no_grad()
def llada_generate(
    model: torch.nn.Module,
    prompt_ids: Any,
    *,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_token_id: int,
    logits_shift: bool = False,
    attention_mask: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """LLaDA's sampler. Returns (batch, prompt_len + gen_length) token ids.

    ``gen_length`` must be a multiple of ``block_length`` and ``steps`` a multiple of the number of
    blocks. ``temperature`` > 0 adds Gumbel noise (in float64) before the argmax; ``cfg_scale`` > 0
    mixes in the logits of the prompt-masked input: ``un + (cfg + 1) * (cond - un)``.
    ``callback(step, x)`` (if given) sees the sequence after every step.
    """
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError("steps, gen_length and block_length must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks}")
    steps_per_block = steps // num_blocks

    device = _model_device(model)
    prompt, am = _as_batch(prompt_ids, attention_mask, device)
    gen = _generator(generator, seed, device)
    if am is not None and not _takes_positions(model):
        # LLaDA's published forward ignores the attention mask: padding would leak into every other
        # position. Rows of a padded batch are generated one at a time, each without its padding.
        rows = []
        for j in range(prompt.shape[0]):
            real = prompt[j][am[j].bool()][None]
            out = llada_generate(
                model, real, steps=steps, gen_length=gen_length, block_length=block_length,
                temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, mask_token_id=mask_token_id,
                logits_shift=logits_shift, generator=gen, callback=callback,
            )
            rows.append(torch.cat([prompt[j], out[0, real.shape[1]:]]))
        return torch.stack(rows)
    batch, plen = prompt.shape
    x = torch.cat([prompt, prompt.new_full((batch, gen_length), mask_token_id)], dim=1)
    full_am = _full_mask(am, gen_length)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :plen] = True

    inputs = mask_inputs(model, full_am)
    inputs_cfg = mask_inputs(model, None if full_am is None else torch.cat([full_am, full_am])) if cfg_scale > 0 else {}
    step = 0
    for b in range(num_blocks):
        start, end = plen + b * block_length, plen + (b + 1) * block_length
        schedule = num_transfer_tokens((x[:, start:end] == mask_token_id).sum(dim=1), steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_token_id
            if cfg_scale > 0:
                un_x = x.masked_fill(prompt_index, mask_token_id)
                both = _step_logits(model, torch.cat([x, un_x]), inputs_cfg, logits_shift)
                cond, un = both.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = _step_logits(model, x, inputs, logits_shift)

            if temperature > 0:
                # Gumbel-max in float64: exp(l) / (-log u)^T, whose argmax samples softmax(l / T).
                l64 = logits.to(torch.float64)
                u = torch.rand(l64.shape, generator=gen, device=device, dtype=torch.float64)
                x0 = (l64.exp() / (-torch.log(u)) ** temperature).argmax(dim=-1)
            else:
                x0 = logits.argmax(dim=-1)

            if remasking == "low_confidence":
                p = F.softmax(logits.float(), dim=-1)
                conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                conf = torch.rand(x0.shape, generator=gen, device=device)
            # Only masks of the current block compete; the prompt and later blocks never do.
            allowed = torch.zeros_like(mask_index)
            allowed[:, start:end] = True
            conf = torch.where(mask_index & allowed, conf.to(torch.float64), -math.inf)
            x0 = torch.where(mask_index, x0, x)

            transfer = torch.zeros_like(mask_index)
            for j in range(batch):
                k = int(schedule[j, i])
                if k:
                    transfer[j, torch.topk(conf[j], k).indices] = True
            x = torch.where(transfer, x0, x)
            if callback is not None:
                callback(step, x.clone())
            step += 1
    return x


# ----------------------------------------------------------------------------------- Dream
def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
    drop[..., 0] = False
    remove = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def _sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    confidence: str,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) per row of ``logits`` (n, vocab), following Dream's ``sample_tokens``."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_filter(logits, top_p)
    if top_k:
        logits = _top_k_filter(logits, top_k)
    probs = F.softmax(logits, dim=-1)
    if temperature > 0 and probs.shape[0]:
        x0 = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        conf = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if confidence == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        conf = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0)
    elif confidence == "neg_entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return conf, x0


_DREAM_ALGS = {"origin": None, "maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


@torch.no_grad()
def dream_generate(
    model: torch.nn.Module,
    prompt_ids: Any,
    *,
    steps: int = 512,
    max_new_tokens: int = 128,
    eps: float = 1e-3,
    alg: str = "origin",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float | None = None,
    mask_token_id: int,
    logits_shift: bool = True,
    attention_mask: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Dream's ``diffusion_generate`` sampler. Returns (batch, prompt_len + max_new_tokens) token ids.

    Time runs over ``linspace(1, eps, steps + 1)``; at step ``t -> s``:

    * ``origin``: every mask is revealed with probability ``1 - s/t`` (all at the last step), its
      token sampled from the (temperature / top-p / top-k filtered) distribution;
    * ``maskgit_plus`` / ``topk_margin`` / ``entropy``: confidence = probability of the chosen token,
      top-1 minus top-2 probability, or negative entropy; ``int(#masks * (1 - s/t))`` masks (all at
      the last step) are revealed: the most confident, or, with ``alg_temp`` > 0, drawn from
      ``softmax(confidence / alg_temp)``.

    Masks are counted per row (Dream counts the batch mean; they agree when the rows are aligned).
    """
    if alg not in _DREAM_ALGS:
        raise ValueError(f"alg must be one of {', '.join(_DREAM_ALGS)}, got {alg!r}")
    if steps <= 0 or max_new_tokens <= 0:
        raise ValueError("steps and max_new_tokens must be positive")
    device = _model_device(model)
    prompt, am = _as_batch(prompt_ids, attention_mask, device)
    gen = _generator(generator, seed, device)
    batch, plen = prompt.shape
    x = torch.cat([prompt, prompt.new_full((batch, max_new_tokens), mask_token_id)], dim=1)
    full_am = _full_mask(am, max_new_tokens)
    gen_region = torch.zeros_like(x, dtype=torch.bool)
    gen_region[:, plen:] = True
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    sample = dict(temperature=temperature, top_p=top_p, top_k=top_k, gen=gen)
    inputs = mask_inputs(model, full_am)

    for i in range(steps):
        mask_index = (x == mask_token_id) & gen_region
        if not bool(mask_index.any()):
            break
        logits = _step_logits(model, x, inputs, logits_shift)
        mask_logits = logits[mask_index]
        t, s = float(timesteps[i]), float(timesteps[i + 1])
        last = i == steps - 1
        if alg == "origin":
            p_transfer = 1.0 if last else 1 - s / t
            x0 = torch.full((mask_logits.shape[0],), mask_token_id, dtype=torch.long, device=device)
            reveal = torch.rand(x0.shape, generator=gen, device=device, dtype=torch.float64) < p_transfer
            if bool(reveal.any()):
                _, tok = _sample_tokens(mask_logits[reveal], confidence="prob", **sample)
                x0[reveal] = tok
            x = x.clone()
            x[mask_index] = x0
        else:
            conf, x0 = _sample_tokens(mask_logits, confidence=_DREAM_ALGS[alg], **sample)
            full_conf = torch.full(x.shape, -math.inf, dtype=torch.float64, device=device)
            full_conf[mask_index] = conf.to(torch.float64)
            proposal = x.clone()
            proposal[mask_index] = x0
            n_masked = mask_index.sum(dim=1)
            for j in range(batch):
                m = int(n_masked[j])
                n = m if last else int(m * (1 - s / t))
                if n <= 0:
                    continue
                if alg_temp:
                    probs = F.softmax(full_conf[j] / alg_temp, dim=-1)
                    idx = torch.multinomial(probs, n, replacement=False, generator=gen)
                else:
                    idx = torch.topk(full_conf[j], n).indices
                x[j, idx] = proposal[j, idx]
        if callback is not None:
            callback(i, x.clone())
    return x


# ----------------------------------------------------------------------------------- front
def generate(
    model: torch.nn.Module,
    prompt_ids: Any,
    *,
    gen_length: int = 64,
    steps: int | None = None,
    sampler: str | None = None,
    mask_token_id: int | None = None,
    logits_shift: bool | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate with the sampler of the model's family: Dream's for shifted-logits models (Dream),
    LLaDA's otherwise. ``sampler="llada" | "dream"`` overrides the choice.

    ``gen_length`` new tokens in ``steps`` steps (default: one token per step). For LLaDA,
    ``block_length`` defaults to ``gen_length`` (one block). Other keyword arguments go to
    :func:`llada_generate` or :func:`dream_generate`.
    """
    mask_default, shift_default = (None, None)
    if mask_token_id is None or logits_shift is None:
        mask_default, shift_default = dllm_settings(model)
    mask_token_id = mask_default if mask_token_id is None else mask_token_id
    logits_shift = shift_default if logits_shift is None else logits_shift
    if sampler is None:
        sampler = "dream" if logits_shift else "llada"
    steps = gen_length if steps is None else steps
    if sampler == "llada":
        kwargs.setdefault("block_length", gen_length)
        return llada_generate(model, prompt_ids, steps=steps, gen_length=gen_length,
                              mask_token_id=mask_token_id, logits_shift=logits_shift, **kwargs)
    if sampler == "dream":
        return dream_generate(model, prompt_ids, steps=steps, max_new_tokens=gen_length,
                              mask_token_id=mask_token_id, logits_shift=logits_shift, **kwargs)
    raise ValueError(f"sampler must be 'llada' or 'dream', got {sampler!r}")
