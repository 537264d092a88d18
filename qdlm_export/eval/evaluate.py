"""Evaluate a quantized checkpoint against its original model, side by side.

:func:`evaluate_checkpoint` runs lm-eval (the ``qdlm`` model, :mod:`.lm_eval_model`) and the held-out
masked-token NLL (:func:`.likelihood.masked_token_nll`) on the original model (the checkpoint's
``quantization_config.provenance.source``, or ``original=``) and on the quantized one, with the
same settings and seeds, and returns the table ``{row: {original, quantized, difference,
higher_is_better}}``. Rows are ``"<task>/<metric>"`` (``"<task>/<metric>:<filter>"`` when lm-eval
applied a named filter) and ``"masked_token_nll"`` (nats per masked token, lower is better).

The table goes into ``qdlm_report.json`` (``"eval"``; the settings under ``"eval_settings"``) and
into the model card: README.md is regenerated when it is the card qdlm-export wrote (unchanged
since), and left alone when someone edited it (the result says which).

A model without a mask token (DiffusionGemma: uniform noise) has no masked likelihood: likelihood
tasks are refused before any model is loaded (:func:`.harness.refuse_likelihood_without_mask`), the
NLL row is skipped, and generation runs the model's own canvas sampler with the generation config
each checkpoint ships (recorded under ``settings["sampler_config"]``; a difference between the
original's and the quantized one's is logged) (:mod:`.canvas_sampler`).

Bundled tasks (``qdlm_stdlib_mc``, ``qdlm_stdlib_gen``) run offline: when every task is a bundled
one, the Hub is switched off for the whole run. Other lm-eval tasks download their data as usual.

The pieces: :mod:`.harness` runs lm-eval on one loaded model, :mod:`.model_args` checks ``-O``
arguments, :mod:`.checkpoint_files` finds the original and stores the table; this module compares.
"""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .checkpoint_files import check_original, original_of, write_eval
from .canvas_sampler import has_mask_token, uses_canvas_sampler
from .harness import all_bundled, refuse_likelihood_without_mask, require_lm_eval, run_tasks, task_list, task_manager
from . import result_cache
from .model_args import check_model_args

# quantize/api.py imports it from here; remove once that caller imports .checkpoint_files (or format).

logger = logging.getLogger(__name__)

NLL_ROW = "masked_token_nll"


# ----------------------------------------------------------------------------------- NLL
def heldout_nll(
    model: torch.nn.Module, tokenizer: Any, *, n: int = 32, seqlen: int = 128, seed: int = 0, batch_size: int = 16
) -> float:
    """Held-out masked-token NLL (nats, lower is better) on ``n`` windows of the shipped corpus's
    held-out tail: the same windows and masks for every model."""
    from .generation import dllm_settings
    from .likelihood import heldout_tokens, masked_token_nll

    mask_id, shift = dllm_settings(model)
    tokens = heldout_tokens(tokenizer, n, seqlen, seed)
    return masked_token_nll(model, tokens, mask_token_id=mask_id, logits_shift=shift, seed=seed, batch_size=batch_size)


# ----------------------------------------------------------------------------------- one model
def evaluate_model(
    model: str | Path | torch.nn.Module,
    tokenizer: Any = None,
    tasks: str | Sequence[str] | None = None,
    *,
    nll: bool = True,
    nll_windows: int = 64,
    nll_seqlen: int = 128,
    nll_seed: int = 0,
    dtype: str | None = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    **run_kwargs: Any,
) -> dict[str, Any]:
    """lm-eval metrics (and the held-out masked-token NLL) of one model: a folder/Hub id or a loaded
    module (then pass ``tokenizer``). Same return shape as :func:`run_tasks`, with the NLL row
    added to ``values``. Loading a folder whose own Python code defines the model (LLaDA, Dream)
    needs ``trust_remote_code=True``; else ``UnsupportedModelError`` names the files."""
    from .offline import offline_mode

    tasks = task_list(tasks)
    offline = run_kwargs.get("offline")
    if offline is None:
        offline = run_kwargs["offline"] = all_bundled(tasks)
    with offline_mode(offline):
        return _evaluate_model(model, tokenizer, tasks, nll=nll, nll_windows=nll_windows, nll_seqlen=nll_seqlen,
                               nll_seed=nll_seed, dtype=dtype, device=device, run_kwargs=run_kwargs,
                               trust_remote_code=trust_remote_code)


def _evaluate_model(model, tokenizer, tasks, *, nll, nll_windows, nll_seqlen, nll_seed, dtype, device, run_kwargs,
                    trust_remote_code=False):
    from ..core.remote_code import refusal_from_transformers, require_trust
    from .canvas_sampler import has_mask_token
    from .loading import load_model, load_tokenizer

    owned = not isinstance(model, torch.nn.Module)
    if owned:
        require_trust(model, trust_remote_code, what="the model")
        config = _folder_config(model)
        if config is not None and not has_mask_token(config):  # likelihood tasks: refused before loading
            refuse_likelihood_without_mask(config, task_manager(tasks, run_kwargs.get("include_path")), tasks)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model, trust_remote_code=trust_remote_code)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            refusal = refusal_from_transformers(exc, str(model))
            if refusal is None:
                raise
            raise refusal from None
    elif tokenizer is None:
        raise ValueError("pass the tokenizer along with a loaded model")
    try:
        out = run_tasks(model, tokenizer, tasks, **run_kwargs)
        if nll and not has_mask_token(model):
            logger.warning("Skipping the held-out masked-token NLL: %s has no mask token", type(model).__name__)
        elif nll:
            out["values"][NLL_ROW] = heldout_nll(model, tokenizer, n=nll_windows, seqlen=nll_seqlen, seed=nll_seed)
            out["higher_is_better"][NLL_ROW] = False
        return out
    finally:
        if owned:
            del model
            gc.collect()


def compare(original: dict[str, Any], quantized: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows ``{original, quantized, difference (quantized - original), higher_is_better, *_stderr}``."""
    table: dict[str, dict[str, Any]] = {}
    rows = list(dict.fromkeys([*original["values"], *quantized["values"]]))
    for row in rows:
        o, q = original["values"].get(row), quantized["values"].get(row)
        entry: dict[str, Any] = {
            "original": _clean(o),
            "quantized": _clean(q),
            "difference": _clean(q - o) if o is not None and q is not None else None,
        }
        hib = quantized["higher_is_better"].get(row, original["higher_is_better"].get(row))
        if hib is not None:
            entry["higher_is_better"] = hib
        for name, res in (("original_stderr", original), ("quantized_stderr", quantized)):
            if row in res.get("stderr", {}):
                entry[name] = _clean(res["stderr"][row])
        table[row] = entry
    return table


def _clean(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), 6)


def evaluate_checkpoint(
    quantized_dir: str | Path,
    tasks: str | Sequence[str] | None = None,
    *,
    limit: int | float | None = None,
    original: str | Path | None = None,
    mc_num: int = 32,
    batch_size: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
    nll: bool = True,
    nll_windows: int = 64,
    nll_seqlen: int = 128,
    nll_seed: int = 0,
    model_args: dict[str, Any] | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    device: str | None = None,
    dtype: str | None = "auto",
    offline: bool | None = None,
    write: bool = True,
    trust_remote_code: bool = False,
    output_path: str | Path | None = None,
    log_samples: bool = False,
    cache: bool = True,
) -> dict[str, Any]:
    """Evaluate the original and the quantized model with the same tasks, settings and seeds.

    ``tasks``: lm-eval task names (list or comma-separated; default: the bundled multiple-choice
    task). ``limit``: examples per task. ``mc_num`` / ``batch_size``: Monte-Carlo copies per
    likelihood and copies per forward pass. ``model_args``: further ``qdlm`` model arguments
    (generation: ``gen_length``, ``steps``, ``block_length``, ``alg``, ...). ``nll``: also the
    held-out masked-token NLL on ``nll_windows`` windows of ``nll_seqlen`` tokens (window and mask
    seed ``nll_seed``). ``offline``:
    default on when every task is a bundled one. ``write``: store the table in the folder's report
    and card. ``trust_remote_code``: allow the Python files of the checkpoint and of its original
    (LLaDA, Dream define their models there); without it such a model is refused, naming the files,
    before anything is loaded. ``output_path``: a folder for lm-eval's results JSON of each model
    (:mod:`.output_path`); ``log_samples``: also each model's per-sample logs there. ``cache``: reuse
    the original model's results from an earlier run with the same settings (:mod:`.result_cache`),
    and store them after evaluating it.

    Returns ``{"table": {row: {...}}, "settings": {...}, "original": str, "quantized": str,
    "card": "regenerated" | "kept" | None, "original_cache": "reused" | "stored" | None,
    "output_path": str | None}``.
    """
    require_lm_eval()
    _check_numbers(mc_num=mc_num, batch_size=batch_size, num_fewshot=num_fewshot, nll_windows=nll_windows,
                   nll_seqlen=nll_seqlen, seed=seed, limit=limit)
    folder_config = _folder_config(quantized_dir)
    check_model_args(dict(model_args or {}), block_diffusion=_block_diffusion(folder_config),
                     canvas=_canvas(folder_config))
    _check_types(quantized_dir=quantized_dir, tasks=tasks, nll=nll, offline=offline, write=write,
                 trust_remote_code=trust_remote_code, device=device, dtype=dtype, log_samples=log_samples,
                 cache=cache)
    if log_samples and output_path is None:
        raise ConfigError("--log-samples needs --output-path", hint="pass --output-path DIR for the per-sample logs")
    from .output_path import check_output_path

    out_dir = check_output_path(output_path) if output_path is not None else None
    folder = Path(quantized_dir).expanduser().resolve()
    from ..core.remote_code import require_trust

    require_trust(folder, trust_remote_code, what="the checkpoint")  # reads config.json only
    from ..format.validation import validate_checkpoint

    # The one checkpoint validation, before anything is loaded or computed: an incomplete or
    # corrupted checkpoint (or a staging folder) is refused naming the file or tensor.
    config = validate_checkpoint(folder, require_qdlm=False).config
    source = str(original) if original is not None else original_of(folder)
    check_original(source)
    require_trust(source, trust_remote_code, what="its original model")
    tasks = task_list(tasks)
    manager = task_manager(tasks, include_path)  # unknown tasks or a missing --include-path, before any loading
    refuse_likelihood_without_mask(config, manager, tasks)  # no mask token (DiffusionGemma): generation only
    if nll and not has_mask_token(config):
        logger.warning("Skipping the held-out masked-token NLL: the model has no mask token (uniform noise)")
        nll = False
    if offline is None:
        offline = all_bundled(tasks)
    common = dict(
        limit=limit, num_fewshot=num_fewshot, mc_num=mc_num, batch_size=batch_size, seed=seed,
        model_args=model_args, include_path=include_path, offline=offline, nll=nll, nll_windows=nll_windows,
        nll_seqlen=nll_seqlen, nll_seed=nll_seed, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        log_samples=log_samples,
    )
    from .loading import load_tokenizer
    from .offline import offline_mode

    with offline_mode(offline):
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)  # one tokenizer for both, so both see the same tokens
        key = _cache_key(source, folder, tasks, common) if cache else None
        orig = result_cache.lookup(key, need_samples=log_samples) if key is not None else None
        if orig is not None:
            cached = "reused"
            logger.info("Reusing the original model's results from %s", result_cache.entry_path(key))
        else:
            logger.info("Evaluating the original model %s", source)
            orig = evaluate_model(source, tokenizer, tasks, **common)
            cached = "stored" if key is not None and result_cache.store(key, orig) is not None else None
        logger.info("Evaluating the quantized model %s", folder)
        quant = evaluate_model(folder, tokenizer, tasks, **common)
    table = compare(orig, quant)
    settings = {
        "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "mc_num": mc_num,
        "batch_size": batch_size if batch_size is not None else min(mc_num, 32), "seed": seed,
        "model_args": dict(model_args or {}),
        "nll": {"windows": nll_windows, "seqlen": nll_seqlen, "seed": nll_seed} if nll else None,
        "original": source, "lm_eval_version": quant.get("lm_eval_version"),
    }
    if quant.get("sampler_config") is not None:  # the canvas sampler's generation config, as each model ran it
        settings["sampler_config"] = quant["sampler_config"]
        if orig.get("sampler_config") != quant["sampler_config"]:
            logger.warning("The original and the quantized checkpoint ship different generation configs: %s vs %s",
                           orig.get("sampler_config"), quant["sampler_config"])
    card = write_eval(folder, table, settings) if write else None
    if out_dir is not None:
        from .output_path import write_outputs

        write_outputs(out_dir, {"original": orig, "quantized": quant}, {"table": table, "settings": settings})
    return {"table": table, "settings": settings, "original": source, "quantized": str(folder), "card": card,
            "original_cache": cached, "output_path": str(out_dir) if out_dir is not None else None}


def _folder_config(folder: Any) -> dict[str, Any] | None:
    """The checkpoint's config.json, or None when it cannot be read here (the checks after the first
    use say why)."""
    import json

    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def _block_diffusion(config: dict[str, Any] | None) -> bool:
    """Whether the checkpoint's family samples with its own block sampler (LLaDA2)."""
    from .block_sampler import block_length_of

    return config is not None and block_length_of(config) is not None


def _canvas(config: dict[str, Any] | None) -> bool:
    """Whether the checkpoint's family samples with its own canvas sampler (DiffusionGemma)."""
    return config is not None and uses_canvas_sampler(config)


def _cache_key(source: str, folder: Path, tasks: list[str], common: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the original model's numbers (see :mod:`.result_cache`)."""
    settings = {k: v for k, v in common.items() if k not in ("offline", "log_samples", "trust_remote_code",
                                                             "include_path", "device")}
    settings["batch_size"] = settings["batch_size"] if settings["batch_size"] is not None else min(settings["mc_num"], 32)
    settings["model_args"] = dict(settings["model_args"] or {})
    return {
        "model": result_cache.model_identity(source), "tokenizer": result_cache.tokenizer_digest(folder),
        "tasks": list(tasks), "include_path": result_cache.include_path_digest(common["include_path"]),
        "device": common["device"] or ("cuda" if torch.cuda.is_available() else "cpu"),
        "settings": settings, "versions": _versions(),
    }


def _versions() -> dict[str, str | None]:
    """lm-eval's and qdlm-export's versions: an upgrade may change the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("lm-eval", "qdlm-export"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


EVAL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_types(*, quantized_dir: Any, tasks: Any, nll: Any, offline: Any, write: Any, trust_remote_code: Any,
                 device: Any, dtype: Any, log_samples: Any = False, cache: Any = True) -> None:
    """The other arguments of :func:`evaluate_checkpoint`: a truthy string must not pass for
    ``True`` (``write='no'``, ``trust_remote_code='no'``), nor torch see an unknown device."""
    from ..core.arguments import check_bool, check_device, check_path
    from ..errors import ArgumentTypeError

    check_path("evaluate_checkpoint", "quantized_dir", quantized_dir)
    for name, value in (("nll", nll), ("write", write), ("trust_remote_code", trust_remote_code),
                        ("log_samples", log_samples), ("cache", cache)):
        check_bool("evaluate_checkpoint", name, value)
    check_bool("evaluate_checkpoint", "offline", offline, optional=True)
    if tasks is not None and not isinstance(tasks, str) and not (
        isinstance(tasks, Sequence) and all(isinstance(t, str) for t in tasks)
    ):
        raise ArgumentTypeError(
            f"evaluate_checkpoint() argument tasks must be a str or a list of str, got {type(tasks).__name__} {tasks!r}",
            hint="pass task names, e.g. ['qdlm_stdlib_mc'] or 'arc_easy,hellaswag'",
        )
    if device is not None:
        check_device(device, allow_auto=False)
    named = {getattr(torch, d) for d in EVAL_DTYPES[1:]}
    if dtype is not None and not (dtype in named or (isinstance(dtype, str) and dtype.removeprefix("torch.") in EVAL_DTYPES)):
        raise ConfigError(f"--dtype {dtype!r} is not supported", hint=f"choose one of {', '.join(EVAL_DTYPES)}")


def _check_numbers(*, limit: Any, **ints: Any) -> None:
    """The numeric arguments of :func:`evaluate_checkpoint`, checked before any work (named as the
    ``eval`` options they come from)."""
    lows = {"mc_num": 1, "batch_size": 1, "num_fewshot": 0, "nll_windows": 1, "nll_seqlen": 2, "seed": 0}
    for name, value in ints.items():
        if value is None and name in ("batch_size", "num_fewshot"):
            continue
        option = "--" + name.replace("_", "-")
        high = 2**32 - 1 if name == "seed" else None  # lm-eval seeds numpy, which takes 32 bits
        accepted = f"an integer >= {lows[name]}" if high is None else f"an integer from {lows[name]} to 2**32-1"
        if isinstance(value, bool) or not isinstance(value, int) or value < lows[name] or (high and value > high):
            raise ConfigError(f"{option} {value!r} is invalid", hint=f"{option} accepts {accepted}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not math.isfinite(limit) or limit <= 0):
        raise ConfigError(f"--limit {limit!r} is invalid",
                          hint="--limit accepts a positive number of examples, or a fraction in (0, 1)")


def format_table(table: dict[str, dict[str, Any]]) -> str:
    """The table as Markdown (for terminals and docs)."""
    lines = ["| Metric | Original | Quantized | Difference |", "|---|---:|---:|---:|"]
    for row, v in table.items():
        arrow = {True: " ↑", False: " ↓"}.get(v.get("higher_is_better"), "")

        def f(x: Any) -> str:
            return "—" if x is None else f"{x:.4f}"

        diff = v.get("difference")
        lines.append(f"| {row}{arrow} | {f(v.get('original'))} | {f(v.get('quantized'))} | "
                     f"{'—' if diff is None else f'{diff:+.4f}'} |")
    return "\n".join(lines)
