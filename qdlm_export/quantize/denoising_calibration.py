"""Calibration windows as DiffusionGemma's sampler shows them to the model, and the held-out error of
a model on them.

DiffusionGemma (``families/diffusion_gemma.py``) never runs its layers over a whole window. Its
``generate`` (transformers' ``generation_diffusion_gemma.py``) encodes the clean context with the causal
encoder, which writes the key/value cache, then denoises a canvas of ``canvas_length`` tokens with the
bidirectional decoder reading that cache: the first step starts from uniformly random ids over the
whole vocabulary with no self-conditioning; each later step keeps the tokens the entropy-bound sampler
accepted, replaces every other position by a fresh uniformly random id, and feeds the previous step's
(temperature-scaled) logits back as self-conditioning. Calibrating on whole clean windows shows the
linears none of the canvas' inputs: random ids, self-conditioning, positions after the cache.

A window of ``seqlen`` tokens becomes (:func:`noise_windows`, draws from one seeded generator):

* **split**: the last ``K = min(canvas_length, seqlen // 2)`` tokens are the canvas, the rest the
  clean context -- the config's ``canvas_length``, capped so the context keeps at least half the
  window (:func:`split_canvas_length`): a published canvas of 256 with calibration windows of 512
  tokens still has 256 tokens of context, and a short window is not all canvas;
* **noise level**: a fraction ``first_step_fraction`` of windows (default 1/8) are first steps: level
  1, every canvas position replaced, no self-conditioning. The others are later steps at a level
  ``t ~ U(0, 1)``: ``round(t * K)`` positions chosen at random are replaced, the rest keep the clean
  token (the accepted tokens). The sampler's own schedule is adaptive (how many tokens the entropy
  bound accepts per step), so a uniform level stands in for "some step of the trajectory"; first steps
  are over-represented (a canvas takes up to ``max_denoising_steps``, 48 by default, steps) because
  they are the one input without self-conditioning and with a fully random canvas;
* **replaced ids**: uniform over ``[0, vocab_size)``, the sampler's ``torch.randint`` (a replaced
  position may draw its clean id back, as in the sampler);
* **self-conditioning** (later steps only): the previous step's logits cannot be computed during a
  layer walk (they need the whole model), so a soft prediction built from the clean canvas stands in
  for them: at every canvas position a distribution putting probability ``c`` on the clean token and
  the rest uniformly on the others. Per window ``c_noised ~ U(0, 1)`` at the replaced positions and
  ``c_kept ~ U(c_noised, 1)`` at the kept ones: the sampler keeps the positions whose prediction had
  the lowest entropy, so they were predicted at least as confidently as the ones it re-noised.

Encoder-only windows (``mode="encoder"``, GPTQModel's shortcut: calibrate only the causal encoder on
whole clean windows) have the whole window as context and an empty canvas.

:func:`denoising_error` measures a model against the original on such windows: both run the model's
own forward (``input_ids=context, decoder_input_ids=canvas, self_conditioning_logits=...``) on the same
inputs, and the result is the relative error of the canvas logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

DENOISING_MODES = ("denoising", "encoder")
DEFAULT_FIRST_STEP_FRACTION = 0.125
DEFAULT_CANVAS_LENGTH = 256  # DiffusionGemmaConfig's default, when a config does not set it


@dataclass(frozen=True)
class DenoisingWindows:
    """Calibration windows cut and noised as the sampler's forward sees them (module docstring).

    Per window: ``context`` [n, C] clean tokens for the encoder; ``canvas`` [n, K] what the decoder
    reads; ``clean`` [n, K] the window's own tokens there; ``noised`` [n, K] the positions replaced by a
    random id; ``noise_level`` [n] the drawn level (1 for first steps); ``self_conditioned`` [n] False
    for first steps; ``confidence`` [n, K] the probability the self-conditioning puts on the clean token
    (0 where there is none)."""

    context: torch.Tensor
    canvas: torch.Tensor
    clean: torch.Tensor
    noised: torch.Tensor
    noise_level: torch.Tensor
    self_conditioned: torch.Tensor
    confidence: torch.Tensor
    vocab_size: int

    def __len__(self) -> int:
        return self.context.shape[0]

    @property
    def context_length(self) -> int:
        return self.context.shape[1]

    @property
    def canvas_length(self) -> int:
        return self.canvas.shape[1]

    def select(self, rows: slice) -> DenoisingWindows:
        """The windows ``rows`` (a batch)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return DenoisingWindows(**{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def batches(self, batch_size: int) -> Iterator[DenoisingWindows]:
        for start in range(0, len(self), batch_size):
            yield self.select(slice(start, start + batch_size))

    def self_conditioning_logits(self, device: torch.device | str | None = None,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[n, K, vocab]`` logits whose softmax is the self-conditioning distribution of each position:
        ``log(c (V - 1) / (1 - c))`` at the clean token, 0 elsewhere (all zeros for first steps, which
        ``self_conditioned`` masks out). What the model's own forward takes; the layer walk computes
        the same soft embeddings without this ``vocab``-wide tensor (``soft_embeddings``)."""
        c = self.confidence.to(torch.float64)
        boost = torch.log(c * (self.vocab_size - 1)) - torch.log1p(-c)
        boost = torch.where(self.self_conditioned[:, None], boost, torch.zeros_like(boost))
        logits = torch.zeros(*self.canvas.shape, self.vocab_size, dtype=dtype, device=device)
        logits.scatter_(2, self.clean[..., None].to(logits.device), boost[..., None].to(logits))
        return logits

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """The keyword arguments of ``DiffusionGemmaForBlockDiffusion.forward`` for these windows."""
        inputs: dict[str, Any] = {"input_ids": self.context.to(device), "decoder_input_ids": self.canvas.to(device)}
        if bool(self.self_conditioned.any()):
            inputs["self_conditioning_logits"] = self.self_conditioning_logits(device)
            inputs["self_conditioning_mask"] = self.self_conditioned.to(device)
        return inputs


def split_canvas_length(seqlen: int, canvas_length: int) -> int:
    """The canvas length of a window of ``seqlen`` tokens: the config's ``canvas_length``, capped at
    ``seqlen // 2`` so the context keeps at least half the window (and never less than the canvas)."""
    if seqlen < 2:
        raise ConfigError(
            f"--seqlen {seqlen} is too short for DiffusionGemma's denoising calibration: a window needs "
            "at least one context token and one canvas token",
            hint="use a longer --seqlen (512 or more keeps the published canvas of 256 tokens whole)",
        )
    if canvas_length <= 0:
        raise ConfigError(f"canvas_length {canvas_length} in the model's config is not a positive integer",
                          hint="use the config.json the checkpoint was saved with")
    return min(canvas_length, seqlen // 2)


def denoising_settings(config: Any) -> tuple[int, int]:
    """``(canvas_length, vocab_size)`` of a DiffusionGemma config (a dict or a config object)."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    text = get(config, "text_config")
    vocab = get(text, "vocab_size") if text is not None else None
    vocab = vocab if vocab is not None else get(config, "vocab_size")
    canvas = get(config, "canvas_length")
    canvas = DEFAULT_CANVAS_LENGTH if canvas is None else canvas
    if not isinstance(vocab, int) or vocab < 2:
        raise ConfigError(f"the model's config has no usable vocab_size ({vocab!r})",
                          hint="use the config.json the checkpoint was saved with")
    if not isinstance(canvas, int) or isinstance(canvas, bool):
        raise ConfigError(f"canvas_length {canvas!r} in the model's config is not an integer",
                          hint="use the config.json the checkpoint was saved with")
    return canvas, vocab


def noise_windows(tokens: torch.Tensor, *, canvas_length: int, vocab_size: int, seed: int,
                  mode: str = "denoising",
                  first_step_fraction: float = DEFAULT_FIRST_STEP_FRACTION) -> DenoisingWindows:
    """``tokens [n, seqlen]`` (clean text) as the sampler's forward sees them (module docstring).

    Draws, in order, from ``torch.Generator().manual_seed(seed)``: which windows are first steps
    (``rand(n) < first_step_fraction``), the levels (``rand(n)``, float64), one ``randperm(K)`` per window
    (its first ``count`` positions are replaced), the replacement ids (``randint(0, vocab_size, [n, K])``,
    used where replaced) and the two confidences (``rand(n)`` each)."""
    if mode not in DENOISING_MODES:
        raise ConfigError(f"unknown denoising calibration mode {mode!r}", hint=f"use one of {DENOISING_MODES}")
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [windows, seqlen], got shape {list(tokens.shape)}")
    if not 0.0 <= first_step_fraction <= 1.0:
        raise ConfigError(f"first_step_fraction {first_step_fraction} is not in [0, 1]",
                          hint="the fraction of windows shown as a sampler's first step, e.g. 0.125")
    tokens = tokens.long()
    n, seqlen = tokens.shape
    canvas = 0 if mode == "encoder" else split_canvas_length(seqlen, canvas_length)
    context, clean = tokens[:, : seqlen - canvas], tokens[:, seqlen - canvas:]
    if canvas == 0:
        empty = torch.zeros(n, 0)
        return DenoisingWindows(context=context, canvas=clean.clone(), clean=clean, noised=empty.bool(),
                                noise_level=torch.zeros(n, dtype=torch.float64),
                                self_conditioned=torch.zeros(n, dtype=torch.bool), confidence=empty,
                                vocab_size=vocab_size)

    gen = torch.Generator().manual_seed(seed)
    first = torch.rand(n, generator=gen) < first_step_fraction
    level = torch.where(first, torch.ones(n, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64))
    noised = torch.zeros(n, canvas, dtype=torch.bool)
    for row in range(n):
        count = round(level[row].item() * canvas)
        noised[row, torch.randperm(canvas, generator=gen)[:count]] = True
    replacement = torch.randint(0, vocab_size, (n, canvas), generator=gen)
    c_noised = torch.rand(n, generator=gen)
    c_kept = c_noised + (1 - c_noised) * torch.rand(n, generator=gen)
    confidence = torch.where(noised, c_noised[:, None], c_kept[:, None])
    confidence = torch.where(first[:, None], torch.zeros_like(confidence), confidence)
    return DenoisingWindows(context=context, canvas=torch.where(noised, replacement, clean), clean=clean,
                            noised=noised, noise_level=level, self_conditioned=~first, confidence=confidence,
                            vocab_size=vocab_size)


def denoising_windows(tokens: torch.Tensor, config: Any, *, seed: int, mode: str = "denoising",
                      first_step_fraction: float = DEFAULT_FIRST_STEP_FRACTION) -> DenoisingWindows:
    """:func:`noise_windows` with the canvas length and vocabulary of the model's ``config``."""
    canvas_length, vocab_size = denoising_settings(config)
    return noise_windows(tokens, canvas_length=canvas_length, vocab_size=vocab_size, seed=seed, mode=mode,
                         first_step_fraction=first_step_fraction)


@torch.no_grad()
def soft_embeddings(windows: DenoisingWindows, embed: nn.Embedding,
                    vocab_sum: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, K, hidden]``: what the decoder computes from :meth:`DenoisingWindows.self_conditioning_logits`
    (``softmax(logits) @ embed.weight * embed_scale``, zero for first steps), in closed form: the
    distribution is ``c`` on the clean token and ``u = (1 - c) / (V - 1)`` on each other, so the
    product is ``(c - u) E[clean] + u sum(E)``. ``vocab_sum``: ``embed.weight.sum(0)`` (at least float32), when
    the caller keeps it across batches."""
    weight = embed.weight
    vocab = weight.shape[0]
    if vocab != windows.vocab_size:
        raise ValueError(f"windows drawn over {windows.vocab_size} ids, but the embeddings have {vocab}")
    compute = torch.promote_types(weight.dtype, torch.float32)
    if vocab_sum is None:
        vocab_sum = weight.to(compute).sum(0)
    c = windows.confidence.to(weight.device, compute)
    other = (1 - c) / (vocab - 1)
    soft = (c - other)[..., None] * weight[windows.clean.to(weight.device)].to(compute) + other[..., None] * vocab_sum
    soft = soft * windows.self_conditioned.to(weight.device, compute)[:, None, None]
    scale = getattr(embed, "embed_scale", None)
    soft = soft.to(weight.dtype)
    return soft * scale.to(weight.dtype) if scale is not None else soft


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def canvas_logits(model: nn.Module, windows: DenoisingWindows, *, batch_size: int = 1) -> Iterator[torch.Tensor]:
    """The model's own canvas logits ``[b, K, vocab]`` (float32), batch by batch."""
    if windows.canvas_length == 0:
        raise ValueError("encoder-only windows have no canvas to score")
    device = _device_of(model)
    for batch in windows.batches(batch_size):
        yield model(**batch.model_inputs(device)).logits.float()


@torch.no_grad()
def denoising_error(model: nn.Module, original: nn.Module, windows: DenoisingWindows, *,
                    batch_size: int = 1) -> float:
    """Relative error of ``model``'s canvas logits against ``original``'s on the same noised windows:
    ``||L_model - L_original||_F / ||L_original||_F`` over every window and canvas position (float64
    sums). Both are ``DiffusionGemmaForBlockDiffusion``s run through their own forward, each on its
    own device. Memory: one batch's ``[batch, K, vocab]`` self-conditioning logits and two logits
    tensors (a published canvas of 256 over 262,144 ids is 256 MiB each in float32 per window)."""
    num = den = 0.0
    for got, want in zip(canvas_logits(model, windows, batch_size=batch_size),
                         canvas_logits(original, windows, batch_size=batch_size), strict=True):
        want = want.to(torch.float64)
        num += (got.to(want.device, torch.float64) - want).pow(2).sum().item()
        den += want.pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else 0.0
