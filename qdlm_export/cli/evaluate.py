"""``qdlm-export eval``: the original and the quantized model side by side with lm-eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import QdlmError
from .console import err, out
from .options import (
    MAX_EVAL_SEED,
    EvalDtype,
    JsonResult,
    Revision,
    RunDevice,
    TrustCheckpointCode,
    examples,
    int_range,
    limit_option,
)

EXAMPLES = examples(
    "qdlm-export eval tiny-w4 --trust-remote-code               # bundled multiple-choice task, offline",
    "qdlm-export eval tiny-w4 --trust-remote-code --tasks qdlm_stdlib_mc,qdlm_stdlib_gen --limit 20 --json",
    "qdlm-export eval llada-w4 --trust-remote-code --tasks arc_easy,hellaswag --limit 200 --mc-num 128",
    "qdlm-export eval llada-w4 --trust-remote-code --tasks gsm8k -O gen_length=256 -O steps=256 -O block_length=32",
    "qdlm-export eval llada2-w4 --trust-remote-code --tasks gsm8k -O gen_length=256 -O threshold=0.95   # LLaDA2's own sampler",
)


def eval_command(
    checkpoint: Annotated[str, typer.Argument(metavar="FOLDER", help="A quantized checkpoint folder written by `qdlm-export quantize`, or its Hub id (owner/name).")],
    tasks: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated lm-eval tasks. Bundled offline tasks: qdlm_stdlib_mc, qdlm_stdlib_gen (tag qdlm_offline) "
                     "[default: qdlm_stdlib_mc; qdlm_stdlib_gen for a model without a mask token (DiffusionGemma)]."),
    ] = None,
    limit: Annotated[
        Optional[float], typer.Option(help="Examples per task (an int, or a fraction below 1) [default: all].", callback=limit_option)
    ] = None,
    original: Annotated[
        Optional[str], typer.Option(help="The original model to compare against [default: the checkpoint's recorded source].")
    ] = None,
    mc_num: Annotated[int, typer.Option(help="Monte-Carlo masked copies per log-likelihood (at least 1).", callback=int_range(1))] = 32,
    batch_size: Annotated[Optional[int], typer.Option(help="Masked copies per forward pass, at least 1 [default: min(mc-num, 32)].", callback=int_range(1))] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per prompt, 0 or more [default: the task's].", callback=int_range(0))] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the masks and of sampling (the same for both models), 0 to 2**32-1.", callback=int_range(0, MAX_EVAL_SEED, "2**32-1"))
    ] = 1234,
    nll: Annotated[bool, typer.Option("--nll/--no-nll", help="Also score the held-out masked-token NLL on the shipped corpus.")] = True,
    option: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", help="A qdlm model argument as KEY=VALUE (repeatable): gen_length, steps, block_length, alg, temperature, threshold (LLaDA2), ... See docs/EVAL.md."),
    ] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option(help="A folder of extra lm-eval task YAMLs (repeatable).")] = None,
    device: RunDevice = None,
    dtype: Annotated[EvalDtype, typer.Option(help="Dtype the models run in.")] = "auto",
    trust_remote_code: TrustCheckpointCode = False,
    revision: Revision = None,
    write: Annotated[bool, typer.Option("--write/--no-write", help="Store the table in the folder's qdlm_report.json and model card.")] = True,
    output_path: Annotated[
        Optional[Path], typer.Option(help="A folder for lm-eval's results JSON of each model and the comparison (new, empty, or a previous --output-path).")
    ] = None,
    log_samples: Annotated[bool, typer.Option("--log-samples", help="Also write each model's per-sample logs into --output-path.")] = False,
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse the original model's results from an earlier run with the same settings ($QDLM_CACHE/eval or ~/.cache/qdlm-export/eval).")
    ] = True,
    as_json: JsonResult = False,
) -> None:
    """Evaluate the original and the quantized model side by side with lm-eval (the `qdlm` dLLM model).

    Generation tasks also report forward passes per generated token for both models."""
    if log_samples and output_path is None:
        raise typer.BadParameter("--log-samples writes into --output-path: pass --output-path DIR", param_hint="--log-samples")
    from ..eval.evaluate import evaluate_checkpoint, format_table
    from ..eval.model_args import parse_model_args
    from ..hub.download import local_checkpoint

    folder = local_checkpoint(checkpoint, revision=revision)
    write = write and folder == Path(checkpoint).expanduser()  # never into the shared Hub cache

    if tasks is None:
        tasks = default_tasks(folder)
    if limit is not None and limit >= 1:
        limit = int(limit)
    model_args = parse_model_args(option or [])
    if not as_json:
        err.print(f"evaluating the original and {folder} on {tasks} ...", highlight=False)
    result = evaluate_checkpoint(
        folder, tasks, limit=limit, original=original, mc_num=mc_num, batch_size=batch_size,
        num_fewshot=num_fewshot, seed=seed, nll=nll, model_args=model_args,
        include_path=[str(p) for p in include_path] if include_path else None, device=device, dtype=dtype,
        write=write, trust_remote_code=trust_remote_code, output_path=output_path, log_samples=log_samples, cache=cache,
    )
    if result.get("original_cache") == "reused":  # stderr: --json keeps stdout to the JSON alone
        err.print("original model: reused its cached results from an earlier run with the same settings (--no-cache reruns it)",
                  highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if result.get("output_path"):
        out.print(f"wrote lm-eval's results of both models into {result['output_path']}", highlight=False, soft_wrap=True)
    out.print(format_table(result["table"]), highlight=False, soft_wrap=True)
    out.print(f"original: {result['original']}", highlight=False, soft_wrap=True)
    if write:
        where = {"regenerated": "qdlm_report.json and README.md", "kept": "qdlm_report.json (README.md was edited by hand: kept)"}
        out.print(f"wrote the table into {where.get(result['card'], 'qdlm_report.json')} of {folder}", highlight=False, soft_wrap=True)


def default_tasks(folder: Path) -> str:
    """The bundled task that applies to the checkpoint's model: multiple choice scored by masked
    likelihood, or, for a model without a mask token (uniform noise: DiffusionGemma, where masked
    likelihoods do not apply), generation through its own sampler."""
    from ..eval.canvas_sampler import has_mask_token
    from ..eval.tasks import GEN_TASK, MC_TASK
    from ..format.reader import read_config

    try:
        config = read_config(folder)
    except QdlmError:
        return MC_TASK  # evaluate_checkpoint reports what is wrong with the folder
    return MC_TASK if has_mask_token(config) else GEN_TASK
