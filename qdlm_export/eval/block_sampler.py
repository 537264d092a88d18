"""Block-diffusion generation through the model's own sampler, and forward passes per generated token.

LLaDA2 (``FamilyAdapter.block_length`` set) ships its sampler as ``model.generate(...)`` in its
remote code: blocks of ``block_length`` masks denoised left to right, at most ``steps`` steps each,
every step accepting the masks whose confidence exceeds ``threshold`` (at least a scheduled number),
under a block-causal attention mask. Evaluation calls that method, on the original and the quantized
model alike (a quantized checkpoint carries the same modelling file), so what is measured is what
users run. :func:`block_generate` does it one prompt at a time (the published sampler decides on row
0 only), each prompt from the same seed.

:class:`ForwardCounter` counts forward passes, one per sequence, with a hook on the model's first
block (the published sampler calls ``self.forward`` directly, which a hook on the model itself would
miss). With a confidence threshold the number of passes depends on the model: a quantized model
that is less sure of its tokens needs more denoising steps, which is what the eval row
``<task>/forward_passes_per_token`` (passes / generated tokens, EOS included) shows.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Self

import torch

from ..errors import ConfigError

__all__ = ["PUBLISHED_DEFAULTS", "ForwardCounter", "block_generate", "block_length_of", "generated_length",
           "has_block_sampler"]

# LLaDA2's generate() defaults (inclusionAI/LLaDA2.0-mini modeling_llada2_moe.py); gen_length is the
# task's max_gen_toks instead of the published 2048, and mask/eos ids come from the model's config.
PUBLISHED_DEFAULTS = {"block_length": 32, "steps": 32, "threshold": 0.95, "minimal_topk": 1,
                      "eos_early_stop": False, "temperature": 0.0}

_SAMPLER_ARGS = ("block_length", "steps", "gen_length", "threshold", "minimal_topk", "eos_early_stop", "mask_id",
                 "eos_id")


def block_length_of(model_or_config: Any) -> int | None:
    """The family's block length (None: not a block-diffusion family)."""
    from ..errors import UnsupportedModelError
    from ..families import family_for_config

    config = getattr(model_or_config, "config", model_or_config)
    try:
        return family_for_config(config).block_length
    except UnsupportedModelError:  # an unknown family has no block sampler
        return None


def has_block_sampler(model: torch.nn.Module) -> bool:
    """Whether ``model.generate`` is a block-diffusion sampler (takes the published arguments)."""
    try:
        params = inspect.signature(model.generate).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return all(name in params for name in _SAMPLER_ARGS)


def _first_block(model: torch.nn.Module) -> torch.nn.Module:
    """The module every forward pass runs exactly once: the first decoder block (else the model)."""
    from ..families import family_for_config

    try:
        blocks = model.get_submodule(family_for_config(model.config).blocks)
        return blocks[0]
    except Exception:  # noqa: BLE001 - an unknown layout: count calls of the model itself
        return model


class ForwardCounter:
    """``with ForwardCounter(model) as c: ...``; ``c.passes``: forward passes, one per sequence of a batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = _first_block(model)
        self.passes = 0
        self._handle = None

    def _count(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        self.passes += int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 else 1

    def __enter__(self) -> Self:
        self._handle = self.module.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def generated_length(row: Sequence[int], eos_id: int | None, mask_id: int) -> int:
    """Tokens a sampler generated in ``row`` (the answer): up to and including the first EOS, masks
    left unfilled not counted."""
    row = list(row)
    if eos_id is not None and eos_id in row:
        row = row[: row.index(eos_id) + 1]
    return sum(1 for t in row if t != mask_id)


def block_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    gen_length: int,
    mask_id: int,
    eos_id: int | None,
    seed: int,
    block_length: int = PUBLISHED_DEFAULTS["block_length"],
    steps: int = PUBLISHED_DEFAULTS["steps"],
    threshold: float = PUBLISHED_DEFAULTS["threshold"],
    minimal_topk: int = PUBLISHED_DEFAULTS["minimal_topk"],
    eos_early_stop: bool = PUBLISHED_DEFAULTS["eos_early_stop"],
    temperature: float = PUBLISHED_DEFAULTS["temperature"],
    top_p: float | None = None,
    top_k: int | None = None,
) -> list[list[int]]:
    """The answer of each prompt (prompt removed, EOS kept when generated) from ``model.generate``.

    Each prompt is sampled alone from ``seed`` (the published sampler draws from torch's global RNG,
    which is restored afterwards), so the original and the quantized model see the same draws.
    """
    if not has_block_sampler(model):
        raise ConfigError(
            f"{type(model).__name__}.generate is not a block-diffusion sampler (it takes no block_length, "
            "threshold, mask_id)",
            hint="the block sampler comes from the model's own modelling file (LLaDA2's modeling_llada2_moe.py); "
            "load the checkpoint with --trust-remote-code, or choose -O sampler=llada",
        )
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    answers = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            try:
                out = model.generate(
                    inputs=ids, temperature=temperature, block_length=block_length, steps=steps,
                    gen_length=gen_length, top_p=top_p, top_k=top_k, eos_early_stop=eos_early_stop,
                    minimal_topk=minimal_topk, threshold=threshold, eos_id=eos_id, mask_id=mask_id,
                )
            except RuntimeError as exc:
                if "attn_mask dtype" in str(exc):
                    raise ConfigError(
                        f"the model's own sampler failed: {exc}",
                        hint="LLaDA2's published generate() builds its block mask in bfloat16, which SDPA attention "
                        "refuses with a model of another dtype: evaluate with --dtype bfloat16",
                    ) from None
                raise
        answers.append(out[0, ids.shape[1]:].tolist())
    return answers
