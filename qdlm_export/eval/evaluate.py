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

Bundled tasks (``qdlm_stdlib_mc``, ``qdlm_stdlib_gen``) run offline: when every task is a bundled
one, the Hub is switched off for the whole run. Other lm-eval tasks download their data as usual.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import CheckpointError, ConfigError
from .tasks import MC_TASK, OFFLINE_TASKS, tasks_dir
from ..format.spec import LOCAL_SOURCE_FILE, REPORT_FILE

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
NLL_ROW = "masked_token_nll"
DEFAULT_TASKS = (MC_TASK,)
_SKIP_KEYS = {"alias", "name", "sample_len", "samples"}


# ----------------------------------------------------------------------------------- lm-eval
def require_lm_eval() -> None:
    """Raise a clear error when lm-eval (the ``eval`` extra) is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"Evaluation needs lm-evaluation-harness, which is not installed ({e}).",
            hint="pip install 'qdlm-export[eval]'",
        ) from None


def _task_list(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return list(DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out = [t.strip() for t in tasks if t and t.strip()]
    if not out:
        raise ConfigError("no tasks given", hint=f"e.g. --tasks {','.join(OFFLINE_TASKS)}")
    return out


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


def check_model_args(model_args: dict[str, Any]) -> None:
    """Refuse ``-O`` keys the ``qdlm`` model does not take (lm-eval would only log them) and
    non-finite numbers, stating what is accepted."""
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
    sizes = {k: model_args.get(k) for k in ("gen_length", "block_length", "steps")}
    llada_blocks = model_args.get("sampler") != "dream"  # Dream's sampler has no blocks
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
    "temperature": ("float", 0), "cfg_scale": ("float", 0), "alg_temp": ("float", 0),
    "top_p": ("fraction", "a number in (0, 1]"), "eps": ("fraction", "a number in (0, 1)"),
    "estimator": ("choice", ("auto", "llada", "dream")), "sampler": ("choice", ("auto", "llada", "dream")),
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


def _all_bundled(tasks: Sequence[str]) -> bool:
    return all(t in OFFLINE_TASKS or t == "qdlm_offline" for t in tasks)


def _flatten(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float], dict[str, bool]]:
    """lm-eval's ``results`` -> (values, stderrs, higher_is_better), keyed ``task/metric[:filter]``."""
    values: dict[str, float] = {}
    stderrs: dict[str, float] = {}
    better: dict[str, bool] = {}
    hib = results.get("higher_is_better", {})
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in _SKIP_KEYS or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            is_stderr = metric.endswith("_stderr")
            base = metric.removesuffix("_stderr")
            row = f"{task}/{base}" + ("" if filt == "none" else f":{filt}")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            value = float(value)
            if is_stderr:
                stderrs[row] = value
            else:
                values[row] = value
                if base in hib.get(task, {}):
                    better[row] = bool(hib[task][base])
    return values, stderrs, better


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    mc_num: int = 32,
    batch_size: int | None = None,
    seed: int = 1234,
    model_args: dict[str, Any] | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    offline: bool | None = None,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` with the ``qdlm`` model on an already loaded ``model``.

    Returns ``{"values": {row: x}, "stderr": {row: se}, "higher_is_better": {row: bool},
    "lm_eval_version": str}``. ``model_args`` are further :class:`~.lm_eval_model.QdlmLM` arguments
    (``gen_length``, ``steps``, ``alg``, ...). ``include_path`` adds task folders to the bundled one.
    """
    require_lm_eval()
    tasks = _task_list(tasks)
    if offline is None:
        offline = _all_bundled(tasks)
    from .lm_eval_model import offline_mode

    with offline_mode(offline):
        return _run_tasks(model, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot, mc_num=mc_num,
                          batch_size=batch_size, seed=seed, model_args=model_args, include_path=include_path,
                          bootstrap_iters=bootstrap_iters)


def task_manager(tasks: Sequence[str], include_path: Any = None) -> Any:
    """lm-eval's ``TaskManager`` over the bundled tasks, ``include_path`` and (unless every task is
    bundled) lm-eval's own; a missing ``include_path`` folder or a task name it does not know is a
    ``ConfigError`` here, before any model is loaded (lm-eval would raise a bare ``KeyError`` after)."""
    from lm_eval.tasks import TaskManager

    paths = [str(tasks_dir())]
    if include_path is not None:
        extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
        for folder in extra:
            if not Path(folder).expanduser().exists():
                raise ConfigError(f"--include-path {folder} does not exist",
                                  hint="pass a folder of lm-eval task YAML files")
        paths += [str(Path(p).expanduser()) for p in extra]
    manager = TaskManager(include_path=paths, include_defaults=not _all_bundled(tasks))
    unknown = [t for t in tasks if not manager.match_tasks([t]) and not (t.endswith(".yaml") and Path(t).is_file())]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            hint=f"check the spelling (lm-eval ls tasks lists them); bundled offline tasks: {', '.join(OFFLINE_TASKS)}; "
            "add your own task folders with --include-path",
        )
    return manager


def _run_tasks(model, tokenizer, tasks, *, limit, num_fewshot, mc_num, batch_size, seed, model_args, include_path,
               bootstrap_iters) -> dict[str, Any]:
    import lm_eval

    from .lm_eval_model import QdlmLM

    manager = task_manager(tasks, include_path)
    if batch_size is None:
        batch_size = min(mc_num, 32)
    args = dict(model_args or {})
    args.setdefault("seed", seed)
    lm = QdlmLM(model=model, tokenizer=tokenizer, mc_num=mc_num, batch_size=batch_size, **args)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    values, stderrs, better = _flatten(results)
    if not values:
        raise ConfigError(
            f"lm-eval produced no metrics for tasks {tasks}",
            hint="check the task names (lm-eval --tasks list) and --limit; the bundled offline tasks are qdlm_stdlib_mc and qdlm_stdlib_gen",
        )
    return {
        "values": values, "stderr": stderrs, "higher_is_better": better,
        "lm_eval_version": getattr(lm_eval, "__version__", None) or _dist_version("lm-eval"),
    }


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - only informational
        return None


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
    from .lm_eval_model import offline_mode

    tasks = _task_list(tasks)
    offline = run_kwargs.get("offline")
    if offline is None:
        offline = run_kwargs["offline"] = _all_bundled(tasks)
    with offline_mode(offline):
        return _evaluate_model(model, tokenizer, tasks, nll=nll, nll_windows=nll_windows, nll_seqlen=nll_seqlen,
                               nll_seed=nll_seed, dtype=dtype, device=device, run_kwargs=run_kwargs,
                               trust_remote_code=trust_remote_code)


def _evaluate_model(model, tokenizer, tasks, *, nll, nll_windows, nll_seqlen, nll_seed, dtype, device, run_kwargs,
                    trust_remote_code=False):
    from ..core.remote_code import refusal_from_transformers, require_trust
    from .lm_eval_model import load_model, load_tokenizer

    owned = not isinstance(model, torch.nn.Module)
    if owned:
        require_trust(model, trust_remote_code, what="the model")
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
        if nll:
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


# ----------------------------------------------------------------------------------- checkpoint
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not readable JSON ({e}).", hint=f"run `qdlm-export inspect {path.parent}`, or restore the file"
        ) from None
    return data if isinstance(data, dict) else {}


def original_of(quantized_dir: str | Path) -> str:
    """The original model a quantized checkpoint was made from (its provenance ``source``)."""
    folder = Path(quantized_dir)
    config = _read_json(folder / "config.json")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(
            f"{folder} is not a quantized checkpoint (config.json has no quantization_config).",
            hint="Pass a folder written by `qdlm-export quantize`.",
        )
    provenance = qc.get("provenance") or {}
    source = provenance.get("source")
    if not source:
        raise CheckpointError(
            f"{folder}/config.json does not say which model it was made from (no provenance.source).",
            hint="Pass the original model with --original.",
        )
    recorded = recorded_local_source(folder)
    if recorded is not None and Path(recorded).is_dir():
        return recorded  # the absolute path quantize saw: found from any working directory
    if Path(str(source)).expanduser().exists():
        return str(source)
    from ..hub.card import looks_like_hub_id

    if provenance.get("source_kind") == "local" or recorded is not None or not looks_like_hub_id(source):
        where = f" (at {recorded} when it was quantized)" if recorded else ""
        raise CheckpointError(
            f"{folder} was made from the local model folder {source}{where}, which is not found from "
            f"{Path.cwd()}.",
            hint="Pass the original model folder with --original PATH.",
        )
    return str(source)


# Where quantize records the absolute path of a local source. `push` uploads an allow-list of
# suffixes (hub.UPLOAD_SUFFIXES) that ".local" is not on, so no local path is ever published.


def record_local_source(folder: str | Path, source_path: str | Path) -> None:
    (Path(folder) / LOCAL_SOURCE_FILE).write_text(
        json.dumps({"source_path": str(Path(source_path).expanduser().resolve())}) + "\n", encoding="utf-8"
    )


def recorded_local_source(folder: str | Path) -> str | None:
    try:
        data = json.loads((Path(folder) / LOCAL_SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = data.get("source_path") if isinstance(data, dict) else None
    return path if isinstance(path, str) and path else None


def _check_original(source: str) -> None:
    from ..hub.card import looks_like_hub_id

    if not Path(source).expanduser().exists() and not looks_like_hub_id(source):
        raise CheckpointError(
            f"The original model {source} (from the checkpoint's provenance) does not exist here.",
            hint="Pass the original model folder or Hub id with --original.",
        )


def _card_is_generated(folder: Path) -> bool:
    """README.md is exactly what qdlm-export renders for the folder as it is now (nobody edited it)."""
    from ..hub.card import render_model_card

    card = folder / CARD_FILE
    try:
        return card.read_text(encoding="utf-8") == render_model_card(folder)
    except Exception:  # noqa: BLE001 - unreadable card or config: treat as edited, never overwrite
        return False


def write_eval(folder: str | Path, table: dict[str, Any], settings: dict[str, Any]) -> str:
    """Store ``table`` in ``qdlm_report.json`` and refresh the model card.

    Returns what happened to README.md: ``"regenerated"`` (it was the generated card, or missing),
    or ``"kept"`` (it was edited by hand: left as is).
    """
    from ..hub.card import write_model_card

    folder = Path(folder)
    card = folder / CARD_FILE
    regenerate = not card.exists() or _card_is_generated(folder)
    report_path = folder / REPORT_FILE
    report = _read_json(report_path) if report_path.is_file() else {}
    report["eval"] = table
    report["eval_settings"] = settings
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if regenerate:
        write_model_card(folder)
        return "regenerated"
    logger.warning("%s was edited by hand; the eval table went into %s only.", card, REPORT_FILE)
    return "kept"


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
    before anything is loaded.

    Returns ``{"table": {row: {...}}, "settings": {...}, "original": str, "quantized": str,
    "card": "regenerated" | "kept" | None}``.
    """
    require_lm_eval()
    _check_numbers(mc_num=mc_num, batch_size=batch_size, num_fewshot=num_fewshot, nll_windows=nll_windows,
                   nll_seqlen=nll_seqlen, seed=seed, limit=limit)
    check_model_args(dict(model_args or {}))
    _check_types(quantized_dir=quantized_dir, tasks=tasks, nll=nll, offline=offline, write=write,
                 trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    folder = Path(quantized_dir).expanduser().resolve()
    from ..core.remote_code import require_trust

    require_trust(folder, trust_remote_code, what="the checkpoint")  # reads config.json only
    from ..format.validation import validate_checkpoint

    # The one checkpoint validation, before anything is loaded or computed: an incomplete or
    # corrupted checkpoint (or a staging folder) is refused naming the file or tensor.
    validate_checkpoint(folder, require_qdlm=False)
    source = str(original) if original is not None else original_of(folder)
    _check_original(source)
    require_trust(source, trust_remote_code, what="its original model")
    tasks = _task_list(tasks)
    task_manager(tasks, include_path)  # unknown tasks or a missing --include-path, before any loading
    if offline is None:
        offline = _all_bundled(tasks)
    common = dict(
        limit=limit, num_fewshot=num_fewshot, mc_num=mc_num, batch_size=batch_size, seed=seed,
        model_args=model_args, include_path=include_path, offline=offline, nll=nll, nll_windows=nll_windows,
        nll_seqlen=nll_seqlen, nll_seed=nll_seed, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
    )
    from .lm_eval_model import load_tokenizer, offline_mode

    with offline_mode(offline):
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)  # one tokenizer for both, so both see the same tokens
        logger.info("Evaluating the original model %s", source)
        orig = evaluate_model(source, tokenizer, tasks, **common)
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
    card = write_eval(folder, table, settings) if write else None
    return {"table": table, "settings": settings, "original": source, "quantized": str(folder), "card": card}


EVAL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_types(*, quantized_dir: Any, tasks: Any, nll: Any, offline: Any, write: Any, trust_remote_code: Any,
                 device: Any, dtype: Any) -> None:
    """The other arguments of :func:`evaluate_checkpoint`: a truthy string must not pass for
    ``True`` (``write='no'``, ``trust_remote_code='no'``), nor torch see an unknown device."""
    from ..core.arguments import check_bool, check_device, check_path
    from ..errors import ArgumentTypeError

    check_path("evaluate_checkpoint", "quantized_dir", quantized_dir)
    for name, value in (("nll", nll), ("write", write), ("trust_remote_code", trust_remote_code)):
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
