"""Uniform-noise block diffusion (DiffusionGemma): the model's own canvas sampler, and what it cannot score.

DiffusionGemma (``FamilyAdapter.noise == "uniform"`` with a :class:`~qdlm_export.families.base.SharedStack`)
ships its sampler in transformers as ``model.generate`` (``DiffusionGemmaGenerationMixin``): the causal
encoder reads the context once per canvas, writing the key/value cache; the bidirectional decoder then
denoises a canvas of ``config.canvas_length`` uniformly random tokens for at most
``max_denoising_steps`` steps (entropy-bounded acceptance, temperature schedule ``t_max -> t_min``,
stopping early once the canvas is stable and confident), and the canvas is appended to the context.
Evaluation calls that method with the generation config the checkpoint ships
(``generation_config.json``), overriding only ``max_new_tokens``, on the original and the quantized
model alike, one prompt at a time from the same seed (the sampler draws from torch's global RNG,
which is restored afterwards).

A forward pass is one decoder denoising step over the canvas (counted by
:class:`~.block_sampler.ForwardCounter` on the decoder's first layer). The encoder's pass over the
context, one per canvas, is not counted: it is the same for both models (the number of canvases is
fixed by ``max_new_tokens`` unless EOS ends generation), while the denoising steps are where a
quantized model that is less sure of its tokens spends more.

There is no mask token, so the Monte-Carlo masked likelihood (:mod:`.likelihood`) does not apply:
likelihood tasks are refused (:func:`likelihood_refusal`) and the held-out masked-token NLL is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["CANVAS_SAMPLER", "canvas_generate", "canvas_length_of", "eos_ids", "has_canvas_sampler",
           "has_mask_token", "likelihood_refusal", "sampler_settings", "uses_canvas_sampler"]

CANVAS_SAMPLER = "canvas"  # the ``sampler`` name of the qdlm lm-eval model for these families
# The fields of DiffusionGemmaGenerationConfig that decide what the sampler does (recorded in the settings).
_SAMPLER_FIELDS = ("max_denoising_steps", "t_min", "t_max", "confidence_threshold", "stability_threshold",
                   "sampler_config", "eos_token_id", "pad_token_id", "cache_implementation")


def _family(model_or_config: Any):
    from ..errors import UnsupportedModelError
    from ..families import family_for_config

    config = getattr(model_or_config, "config", model_or_config)
    try:
        return family_for_config(config)
    except UnsupportedModelError:
        return None


def has_mask_token(model_or_config: Any) -> bool:
    """Whether the model's diffusion noises with a mask token (LLaDA, Dream, LLaDA2); False for a
    uniform-noise family (DiffusionGemma), where masked likelihoods do not apply. An unknown family
    counts as masked: the masked code paths then say what is missing."""
    family = _family(model_or_config)
    return family is None or family.noise == "mask"


def uses_canvas_sampler(model_or_config: Any) -> bool:
    """Whether the family samples with its own canvas sampler: uniform noise, and an encoder stack
    that caches the context for the denoising decoder."""
    family = _family(model_or_config)
    return family is not None and family.noise == "uniform" and family.shared_stack is not None


def has_canvas_sampler(model: torch.nn.Module) -> bool:
    """Whether ``model.generate`` is the canvas sampler: its generation config has the denoising
    fields and its config a canvas length."""
    return (hasattr(getattr(model, "generation_config", None), "max_denoising_steps")
            and isinstance(getattr(getattr(model, "config", None), "canvas_length", None), int))


def canvas_length_of(model: torch.nn.Module) -> int:
    return int(model.config.canvas_length)


def eos_ids(model: torch.nn.Module) -> list[int]:
    """The ids that end an answer: the generation config's EOS ids (the sampler stops on them)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def sampler_settings(model: torch.nn.Module) -> dict[str, Any]:
    """The generation config's sampler fields and the canvas length, as plain JSON data."""
    config = model.generation_config
    out: dict[str, Any] = {"canvas_length": canvas_length_of(model)}
    for name in _SAMPLER_FIELDS:
        value = getattr(config, name, None)
        out[name] = value.to_dict() if hasattr(value, "to_dict") else value
    return out


def canvas_generate(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int
) -> list[list[int]]:
    """The new tokens of each prompt from ``model.generate(input_ids, max_new_tokens=...)``, at most
    ``max_new_tokens`` of them (the sampler fills whole canvases; tokens of the last canvas past
    ``max_new_tokens`` are dropped). Tokens after an EOS are the sampler's padding."""
    if not has_canvas_sampler(model):
        raise ConfigError(
            f"{type(model).__name__}.generate is not a canvas diffusion sampler (its generation config has no "
            "max_denoising_steps, or its config no canvas_length)",
            hint="load the checkpoint with the class its family names (DiffusionGemma: AutoModelForImageTextToText)",
        )
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    answers = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, max_new_tokens=int(max_new_tokens))
        sequences = out.sequences if hasattr(out, "sequences") else out
        answers.append(sequences[0, ids.shape[1]: ids.shape[1] + int(max_new_tokens)].tolist())
    return answers


def likelihood_refusal(tasks: Sequence[str], model: str = "this model") -> ConfigError:
    """The error for likelihood tasks (multiple choice, perplexity) on a model without a mask token."""
    from .tasks import GEN_TASK

    names = ", ".join(tasks)
    plural = len(tasks) > 1
    return ConfigError(
        f"task{'s' if plural else ''} {names} score{'' if plural else 's'} answers by their likelihood, which "
        f"qdlm-export estimates by masking tokens (Monte-Carlo masked likelihood); {model} has no mask token "
        "(its diffusion noises with uniformly random tokens), so that estimate does not apply",
        hint=f"evaluate it on generation tasks instead: --tasks {GEN_TASK} (bundled, offline) or lm-eval "
        "generate_until tasks such as gsm8k; they run the model's own sampler and report forward passes per token",
    )
