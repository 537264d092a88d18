"""``-O KEY=VALUE`` arguments of the ``qdlm`` lm-eval model: typed as lm-eval types
``--model_args``, and checked against :class:`~.lm_eval_model.QdlmLM`'s arguments and their ranges
before any model is loaded (a wrong value would otherwise fail deep inside generation, or be ignored)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..errors import ConfigError


def parse_model_args(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["gen_length=64", "alg=entropy"]`` -> ``{"gen_length": 64, "alg": "entropy"}`` (values typed
    as lm-eval types ``--model_args``: ints, floats, true/false, none)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        for item in str(pair).split(","):
            if not item.strip():
                continue
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"model argument {item!r} is not KEY=VALUE", hint="e.g. -O gen_length=64")
            out[key.strip()] = _typed(raw.strip())
    return out


# QdlmLM arguments set by evaluate_checkpoint itself (its own options), never through -O.
_RESERVED_MODEL_ARGS = {"self", "pretrained", "model", "tokenizer", "mc_num", "batch_size", "dtype", "device",
                        "trust_remote_code", "unused"}


# The -O keys that mean something to the canvas sampler (DiffusionGemma's own generate, which takes
# everything else from the checkpoint's generation config): the answer length, the seed, batching.
CANVAS_MODEL_ARGS = ("gen_length", "seed", "gen_batch_size", "max_length", "max_batch_size", "sampler")


def check_model_args(model_args: dict[str, Any], *, block_diffusion: bool = False, canvas: bool = False) -> None:
    """Refuse ``-O`` keys the ``qdlm`` model does not take (lm-eval would only log them) and
    non-finite numbers, stating what is accepted. ``block_diffusion``: the model's family samples
    with its own block sampler (LLaDA2), which takes any lengths. ``canvas``: it samples with its own
    canvas sampler (DiffusionGemma), configured by its generation config: only
    :data:`CANVAS_MODEL_ARGS` apply."""
    import inspect

    from .lm_eval_model import QdlmLM

    params = inspect.signature(QdlmLM.__init__).parameters
    accepted = sorted(n for n in params if n not in _RESERVED_MODEL_ARGS)
    for key, value in model_args.items():
        if key not in accepted:
            own = {"mc_num": "--mc-num", "batch_size": "--batch-size", "dtype": "--dtype", "device": "--device",
                   "trust_remote_code": "--trust-remote-code"}.get(key)
            raise ConfigError(
                f"-O {key}: not a qdlm model argument" + (f" (use {own})" if own else ""),
                hint=f"-O accepts: {', '.join(accepted)}",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"-O {key}={value} is not a finite number", hint=f"give {key} a finite value")
        _check_model_arg_value(key, value, params[key].default is None)
        if canvas and key not in CANVAS_MODEL_ARGS:
            raise ConfigError(
                f"-O {key}: does not apply to this model's own canvas sampler (DiffusionGemma's generate), which "
                "takes its denoising steps, temperatures, thresholds and sampler from the checkpoint's "
                "generation_config.json",
                hint=f"for this model -O accepts: {', '.join(CANVAS_MODEL_ARGS)} (sampler: auto or canvas)",
            )
    sizes = {k: model_args.get(k) for k in ("gen_length", "block_length", "steps")}
    sampler = model_args.get("sampler", "auto")
    if sampler != "auto" and (sampler == "canvas") != canvas:
        raise ConfigError(
            f"-O sampler={sampler} does not fit this model: " + (
                "it has no mask token to fill; it samples with its own canvas sampler" if canvas
                else "the canvas sampler is the own generate() of uniform-noise models (DiffusionGemma)"),
            hint="leave -O sampler unset: auto picks the family's sampler",
        )
    # Dream's sampler has no blocks; LLaDA2's own sampler takes any gen_length, block_length and steps.
    llada_blocks = sampler == "llada" or (sampler == "auto" and not block_diffusion)
    if llada_blocks and isinstance(sizes["gen_length"], int) and isinstance(sizes["block_length"], int):
        if sizes["gen_length"] % sizes["block_length"]:
            raise ConfigError(
                f"-O gen_length={sizes['gen_length']} is not a multiple of -O block_length={sizes['block_length']}",
                hint="LLaDA's sampler fills whole blocks: make gen_length a multiple of block_length",
            )
        blocks = sizes["gen_length"] // sizes["block_length"]
        if isinstance(sizes["steps"], int) and sizes["steps"] % blocks:
            raise ConfigError(
                f"-O steps={sizes['steps']} is not a multiple of the {blocks} blocks (gen_length / block_length)",
                hint="give each block the same number of steps: steps a multiple of gen_length / block_length",
            )


# The accepted values of each -O key of the qdlm model (QdlmLM's arguments): a kind and its range.
_MODEL_ARG_RULES: dict[str, tuple[str, Any]] = {
    "gen_length": ("int", 1), "steps": ("int", 1), "block_length": ("int", 1), "max_length": ("int", 1),
    "gen_batch_size": ("int", 1), "max_batch_size": ("int", 1), "top_k": ("int", 1), "seed": ("int", 0),
    "temperature": ("float", 0), "cfg_scale": ("float", 0), "alg_temp": ("float", 0), "minimal_topk": ("int", 1),
    "threshold": ("unit", "a number from 0 to 1"), "eos_early_stop": ("bool", None),
    "top_p": ("fraction", "a number in (0, 1]"), "eps": ("fraction", "a number in (0, 1)"),
    "estimator": ("choice", ("auto", "llada", "dream")),
    "sampler": ("choice", ("auto", "llada", "dream", "llada2", "canvas")),
    "remasking": ("choice", ("low_confidence", "random")),
    "alg": ("choice", ("entropy", "maskgit_plus", "topk_margin", "origin")),
    "check_greedy": ("bool", None),
}


def _check_model_arg_value(key: str, value: Any, nullable: bool) -> None:
    """One ``-O KEY=VALUE`` of the qdlm model against :data:`_MODEL_ARG_RULES`, before any model is
    loaded (a wrong value would otherwise fail deep inside generation, or be ignored)."""
    rule = _MODEL_ARG_RULES.get(key)
    if rule is None or (value is None and nullable):
        return
    kind, limit = rule
    none = " (or none)" if nullable else ""
    if kind == "int":
        accepted = f"an integer >= {limit}{none}"
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= limit
    elif kind == "float":
        accepted = f"a number >= {limit}{none}"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= limit
    elif kind == "fraction":
        accepted = limit + none
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
        ok = ok and (key != "eps" or value < 1)
    elif kind == "unit":
        accepted = limit + none
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    elif kind == "bool":
        accepted, ok = "true or false", isinstance(value, bool)
    else:
        accepted, ok = "one of " + ", ".join(limit), value in limit
    if not ok:
        raise ConfigError(f"-O {key}={value!r} is invalid", hint=f"-O {key} accepts {accepted}")


def _typed(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
