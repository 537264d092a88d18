"""lm-eval's ``simple_evaluate`` run with the ``qdlm`` model on a loaded model: the task list, the
task manager (bundled offline tasks first), and lm-eval's results flattened to ``task/metric`` rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .tasks import MC_TASK, OFFLINE_TASKS, tasks_dir

DEFAULT_TASKS = (MC_TASK,)
PASSES_PER_TOKEN = "forward_passes_per_token"  # the row a generation task adds beside its metrics
_SKIP_KEYS = {"alias", "name", "sample_len", "samples"}


def require_lm_eval() -> None:
    """Raise a clear error when lm-eval (the ``eval`` extra) is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"Evaluation needs lm-evaluation-harness, which is not installed ({e}).",
            hint="pip install 'qdlm-export[eval]'",
        ) from None


def task_list(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names from a list or a comma-separated string; None: the bundled multiple-choice task."""
    if tasks is None:
        return list(DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out = [t.strip() for t in tasks if t and t.strip()]
    if not out:
        raise ConfigError("no tasks given", hint=f"e.g. --tasks {','.join(OFFLINE_TASKS)}")
    return out


def all_bundled(tasks: Sequence[str]) -> bool:
    """Every task ships with the package, so the run needs no Hub access."""
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
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` with the ``qdlm`` model on an already loaded ``model``.

    Returns ``{"values": {row: x}, "stderr": {row: se}, "higher_is_better": {row: bool},
    "lm_eval_version": str, "results": {...}}``, ``"results"`` being lm-eval's own results as JSON
    (what its ``--output_path`` writes), plus ``"samples": {task: [...]}`` with ``log_samples`` and
    ``"sampler_config"`` (the generation config) when the model runs its own canvas sampler.
    Likelihood tasks on a model without a mask token are refused before lm-eval starts.
    ``model_args`` are further :class:`~.lm_eval_model.QdlmLM` arguments (``gen_length``,
    ``steps``, ``alg``, ...). ``include_path`` adds task folders to the bundled one.
    """
    require_lm_eval()
    tasks = task_list(tasks)
    if offline is None:
        offline = all_bundled(tasks)
    from .offline import offline_mode

    with offline_mode(offline):
        return _run_tasks(model, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot, mc_num=mc_num,
                          batch_size=batch_size, seed=seed, model_args=model_args, include_path=include_path,
                          bootstrap_iters=bootstrap_iters, log_samples=log_samples)


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
    manager = TaskManager(include_path=paths, include_defaults=not all_bundled(tasks))
    unknown = [t for t in tasks if not manager.match_tasks([t]) and not (t.endswith(".yaml") and Path(t).is_file())]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            hint=f"check the spelling (lm-eval ls tasks lists them); bundled offline tasks: {', '.join(OFFLINE_TASKS)}; "
            "add your own task folders with --include-path",
        )
    return manager


LIKELIHOOD_OUTPUT_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


def likelihood_tasks(manager: Any, tasks: Sequence[str]) -> list[str]:
    """The tasks among ``tasks`` (groups, tags and glob patterns expanded) whose ``output_type`` scores
    answers by likelihood, read from the task configs in ``manager``'s index: no dataset is loaded.
    Tasks whose type the index does not state (Python tasks) are not listed."""
    found: list[str] = []
    seen: set[str] = set()

    def visit(item: Any) -> None:
        if isinstance(item, dict):  # an inline task or group config inside a group
            if item.get("output_type") in LIKELIHOOD_OUTPUT_TYPES:
                found.append(str(item.get("task", item.get("group", "?"))))
            for child in _as_list(item.get("task")) if "group" in item else ():
                visit(child)
            return
        name = str(item)
        if name in seen:
            return
        seen.add(name)
        entry = manager.task_index.get(name)
        if entry is None:
            if name.endswith(".yaml") and Path(name).is_file():
                from lm_eval.tasks._yaml_loader import load_yaml

                visit(load_yaml(Path(name), resolve_func=False, recursive=True))
                return
            for match in manager.match_tasks([name]):  # a glob pattern
                if match != name:
                    visit(match)
            return
        kind = entry.kind.name
        if kind == "TAG":
            for child in sorted(entry.tags):
                visit(child)
        elif kind == "GROUP":
            for child in _as_list((entry.cfg or {}).get("task")):
                visit(child)
        elif (entry.cfg or {}).get("output_type") in LIKELIHOOD_OUTPUT_TYPES:
            found.append(name)

    for task in tasks:
        visit(task)
    return list(dict.fromkeys(found))


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def refuse_likelihood_without_mask(model: Any, manager: Any, tasks: Sequence[str]) -> None:
    """Refuse likelihood tasks for a model (or config) whose diffusion has no mask token, before
    anything runs (:func:`.canvas_sampler.likelihood_refusal`)."""
    from .canvas_sampler import has_mask_token, likelihood_refusal

    if has_mask_token(model):
        return
    scored = likelihood_tasks(manager, tasks)
    if scored:
        from ..families import family_for_config

        family = family_for_config(getattr(model, "config", model))
        raise likelihood_refusal(scored, family.display_name or family.name)


def _run_tasks(model, tokenizer, tasks, *, limit, num_fewshot, mc_num, batch_size, seed, model_args, include_path,
               bootstrap_iters, log_samples=False) -> dict[str, Any]:
    import lm_eval

    from .lm_eval_model import QdlmLM

    manager = task_manager(tasks, include_path)
    refuse_likelihood_without_mask(model, manager, tasks)
    if batch_size is None:
        batch_size = min(mc_num, 32)
    args = dict(model_args or {})
    args.setdefault("seed", seed)
    lm = QdlmLM(model=model, tokenizer=tokenizer, mc_num=mc_num, batch_size=batch_size, **args)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    values, stderrs, better = _flatten(results)
    for task, (passes, tokens) in lm.generation_counts.items():
        if tokens and task:  # forward passes per generated token (EOS included): lower is cheaper
            values[f"{task}/{PASSES_PER_TOKEN}"] = passes / tokens
            better[f"{task}/{PASSES_PER_TOKEN}"] = False
    if not values:
        raise ConfigError(
            f"lm-eval produced no metrics for tasks {tasks}",
            hint="check the task names (lm-eval --tasks list) and --limit; the bundled offline tasks are qdlm_stdlib_mc and qdlm_stdlib_gen",
        )
    samples = results.pop("samples", None)
    out = {
        "values": values, "stderr": stderrs, "higher_is_better": better,
        "lm_eval_version": getattr(lm_eval, "__version__", None) or _dist_version("lm-eval"),
        "results": as_json(results),
    }
    if log_samples:
        out["samples"] = as_json(samples or {})
    from .canvas_sampler import CANVAS_SAMPLER, sampler_settings

    if lm.sampler == CANVAS_SAMPLER:  # what the model's own sampler ran with (its generation config)
        out["sampler_config"] = as_json(sampler_settings(model))
    return out


def as_json(value: Any) -> Any:
    """``value`` as plain JSON data, non-serializable parts (task functions, dtypes) turned into
    strings the way lm-eval's own ``--output_path`` writes them."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable, ensure_ascii=False))


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - only informational
        return None
