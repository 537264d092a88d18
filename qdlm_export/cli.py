"""The ``qdlm-export`` command line: a thin Typer layer that parses, calls the library, and renders.

No logic lives here. Every user-fixable problem arrives as a ``QdlmError`` and leaves through
:func:`main`'s one exception-to-message table; tracebacks appear only with ``QDLM_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__

app = typer.Typer(
    name="qdlm-export",
    help="Quantize diffusion LLMs (LLaDA, Dream, ...) into Hub-ready checkpoints that reload with from_pretrained.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: with rich markup, "[default: 4]" in a help string would be eaten as a tag.
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)

EMBEDDED_DEFAULT = Path(__file__).parent / "assets" / "tiny-llada"


def _examples(*lines: str) -> str:
    """An epilog of example command lines, kept verbatim by click (the \\b marker stops rewrapping)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qdlm-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Quantize diffusion LLMs into Hub-ready checkpoints."""


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    from .errors import ConfigError

    raise ConfigError(f"--max-shard-size {text!r} is not a size", hint="write it like 5GB or 500MB")


# --------------------------------------------------------------------------------------- quantize
@app.command(
    epilog=_examples(
        "qdlm-export quantize --out tiny-w4    # the embedded tiny LLaDA, RTN W4 g128",
        "qdlm-export quantize GSAI-ML/LLaDA-8B-Instruct --trust-remote-code --method gptq --bits 4 --out llada-w4",
        "qdlm-export quantize ./my-model --bits 8 --group-size -1 --asymmetric --out my-model-w8",
        "qdlm-export quantize --method quarot --bits 4 --act-bits 4 --out tiny-w4a4",
    )
)
def quantize(
    model: Annotated[
        Optional[str],
        typer.Argument(help="Local model folder or Hub id. Omitted: the tiny LLaDA embedded in the package (offline)."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")] = ...,
    method: Annotated[
        str, typer.Option("--method", "-m", help="Quantization method: rtn, gptq, awq, smoothquant, quarot, duquant, rtn-wa.")
    ] = "rtn",
    bits: Annotated[Optional[int], typer.Option(help="Weight bits: 2, 3, 4 or 8 [default: 4].")] = None,
    group_size: Annotated[
        Optional[int], typer.Option(help="Input columns per scale group; -1 for one scale per output channel [default: 128].")
    ] = None,
    symmetric: Annotated[
        Optional[bool],
        typer.Option("--symmetric/--asymmetric", help="Symmetric (no zero point) or asymmetric weights [default: the method's; asymmetric for awq].", show_default=False),
    ] = None,
    include_lm_head: Annotated[Optional[bool], typer.Option("--include-lm-head", help="Also quantize the LM head (kept in full precision by default).", show_default=False)] = None,
    group_fallback: Annotated[
        Optional[str], typer.Option(help="When --group-size does not divide a layer's input size: 'error', or 'per-channel' for that layer [default: error].")
    ] = None,
    scale_dtype: Annotated[
        Optional[str], typer.Option(help="Scale dtype: float16, bfloat16 or float32 [default: float32 for float32 models, else float16].")
    ] = None,
    act_bits: Annotated[Optional[int], typer.Option(help="Activation bits for weight-activation methods: 8 or 4 [default: the method's: 8 for smoothquant and rtn-wa, 4 for quarot and duquant].")] = None,
    act_granularity: Annotated[
        Optional[str], typer.Option(help="Activation scales: 'token' (dynamic per token) or 'tensor' (static, calibrated) [default: token].")
    ] = None,
    qkv_bits: Annotated[Optional[int], typer.Option(help="Also quantize attention q/k/v outputs to 8 or 4 bits [default: off].")] = None,
    damp: Annotated[Optional[float], typer.Option(help="GPTQ dampening, a fraction of mean(diag H) [default: 0.01].")] = None,
    act_order: Annotated[Optional[bool], typer.Option("--act-order", help="GPTQ: visit columns by decreasing Hessian diagonal (static groups keep the layout kernel-friendly).", show_default=False)] = None,
    mse_clip: Annotated[Optional[bool], typer.Option("--mse-clip", help="GPTQ: search each group's clipping range by MSE.", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="SmoothQuant/DuQuant migration strength alpha [default: 0.5].")] = None,
    option: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", help="Any other method option as KEY=VALUE (repeatable), e.g. -O block_size=64. See docs/METHODS.md."),
    ] = None,
    calib: Annotated[str, typer.Option(help="Calibration text: 'default' (shipped corpus), a .txt/.jsonl file, a folder, or a Hub dataset.")] = "default",
    calib_field: Annotated[str, typer.Option(help="JSONL/dataset field holding the text.")] = "text",
    nsamples: Annotated[int, typer.Option(help="Calibration sequences.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling and masking.")] = 0,
    calib_masking: Annotated[
        str, typer.Option(help="'random': mask tokens with a per-sample ratio t~U(0,1), as dLLMs see them while denoising (measured better, docs/calibration.md); 'none': clean text, as the study did; 'auto': random for models with a mask token, else none.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (cuda when available).")] = "auto",
    compute_dtype: Annotated[
        Optional[str], typer.Option(help="Dtype blocks run in during calibration [default: float32 on CPU, bfloat16 on CUDA].")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Calibration sequences per forward pass.")] = 8,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB.")] = "5GB",
    output_format: Annotated[
        str, typer.Option("--format", help="Output format: native, gptq, awq or compressed-tensors (see docs/EXPORTS.md).")
    ] = "native",
    self_contained: Annotated[
        bool, typer.Option(help="Native checkpoints of remote-code models carry the loader, so they load without qdlm-export.")
    ] = True,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the model's own modeling code (LLaDA, Dream). Review it first.")
    ] = False,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of MODEL.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option(help="Reload the result and measure its output error against the original.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Quantize MODEL and write a checkpoint that reloads with from_pretrained."""
    from .configs import CalibrationConfig
    from .quantize import make_config
    from .quantize import quantize as run_quantize

    if model is None:
        model, trust_remote_code = str(EMBEDDED_DEFAULT), True  # our own shipped code
    given = dict(
        bits=bits, group_size=group_size, symmetric=symmetric, include_lm_head=include_lm_head,
        group_fallback=group_fallback, scale_dtype=scale_dtype, act_bits=act_bits, act_granularity=act_granularity,
        qkv_bits=qkv_bits, damp=damp, act_order=act_order, mse_clip=mse_clip, alpha=alpha,
    )
    options = {k: v for k, v in given.items() if v is not None}
    options.update(parse_options(method, option or []))
    config = make_config(method, **options)
    calibration = CalibrationConfig(
        source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, masking=calib_masking, text_field=calib_field
    )
    command = "qdlm-export " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _block_progress(disable=as_json) as on_block:
        summary = run_quantize(
            model, out_dir, config, calibration=calibration, trust_remote_code=trust_remote_code,
            overwrite=overwrite, device=device, compute_dtype=compute_dtype, batch_size=batch_size,
            verify=verify, max_shard_bytes=_parse_size(max_shard_size), revision=revision,
            on_block=on_block, command=command, output_format=output_format, self_contained=self_contained,
        )
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    table = Table(title=f"{summary.method} W{summary.bits} g{summary.group_size} -> {summary.out}", show_header=False)
    if summary.act_bits:
        table.title = f"{summary.method} W{summary.bits}A{summary.act_bits} g{summary.group_size} -> {summary.out}"
    table.add_row("quantized linears", str(summary.quantized_modules))
    table.add_row("bits per weight", f"{summary.bits_per_weight:.3f}")
    ratio = summary.linear_bytes_quantized / max(summary.linear_bytes_original, 1)
    table.add_row("linear weights", f"{_size(summary.linear_bytes_original)} -> {_size(summary.linear_bytes_quantized)} ({ratio:.1%})")
    table.add_row("checkpoint", f"{_size(summary.source_checkpoint_bytes)} -> {_size(summary.checkpoint_bytes)}")
    if summary.relative_output_error is not None:
        table.add_row("relative output error", f"{summary.relative_output_error:.4f} (logits vs original, 4 masked samples)")
    table.add_row("time", f"{summary.elapsed_s:.1f} s")
    out.print(table)
    out.print(f"Next: qdlm-export inspect {summary.out}", soft_wrap=True, highlight=False)
    out.print(f"      qdlm-export push {summary.out} YOUR_NAME/REPO", soft_wrap=True, highlight=False)


class _block_progress:
    """A rich progress bar with ETA over decoder blocks (silent with --json)."""

    def __init__(self, disable: bool):
        self.disable = disable

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("quantizing blocks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=err, disable=self.disable, transient=True,
        )
        self.progress.__enter__()
        self.task = None

        def on_block(done: int, total: int) -> None:
            if self.task is None:
                self.task = self.progress.add_task("blocks", total=total)
            self.progress.update(self.task, completed=done)

        return on_block

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def parse_options(method: str, pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings -> typed method options, typed by the method config's fields."""
    import dataclasses
    import typing

    from .errors import ConfigError
    from .methods import method_class

    config_class = method_class(method).config_class
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    parsed: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE", hint="write it like -O block_size=64")
        if key not in fields:
            raise ConfigError(
                f"option {key!r} does not apply to method {method!r}", hint=f"{method} accepts: {', '.join(sorted(fields))}"
            )
        parsed[key] = _coerce(key, raw.strip(), hints.get(key, str))
    return parsed


def _coerce(key: str, raw: str, hint: object) -> object:
    from .errors import ConfigError

    text = str(hint)
    if raw.lower() in ("none", "null") and ("None" in text or "Optional" in text):
        return None
    try:
        if "bool" in text:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in text and "float" not in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError:
        raise ConfigError(f"option {key}={raw!r} is not a valid {text.replace('typing.', '')}") from None
    return raw


# ---------------------------------------------------------------------------------------- inspect
@app.command(epilog=_examples("qdlm-export inspect llada-w4", "qdlm-export inspect llada-w4 --json"))
def inspect(
    folder: Annotated[Path, typer.Argument(help="A checkpoint folder written by `qdlm-export quantize`.")],
    device: Annotated[
        Optional[str], typer.Option(help="Device to report kernel backends for: cpu or cuda [default: cuda when available].")
    ] = None,
    tokens: Annotated[int, typer.Option(help="Rows (batch x sequence) to report kernel backends for.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Describe a checkpoint, validate that every promised tensor exists with the right dtype and shape,
    and show which kernel backend each layer would use."""
    from .inspect import inspect_checkpoint

    info = inspect_checkpoint(folder, device=device, tokens=tokens)
    if as_json:
        typer.echo(json.dumps({**info.to_dict(), "valid": True}, indent=2))
        return
    sym = "symmetric" if info.symmetric else "asymmetric"
    table = Table(title=str(folder), show_header=False)
    table.add_row("method", info.method)
    table.add_row("weights", f"{info.bits}-bit, group {info.group_size}, {sym}, scales {info.scale_dtype}")
    table.add_row("activations", json.dumps(info.activations) if info.activations else "full precision")
    table.add_row("family", str(info.family))
    table.add_row("quantized linears", str(len(info.quantized_modules)))
    table.add_row("kept in full precision", ", ".join(info.modules_not_converted) or "-")
    if info.module_overrides:
        table.add_row("per-module overrides", ", ".join(f"{k}: {v}" for k, v in info.module_overrides.items()))
    table.add_row("bits per weight", f"{info.bits_per_weight:.3f}")
    table.add_row("weights on disk", _size(info.checkpoint_bytes))
    table.add_row("validation", "[green]ok[/green]: every tensor present with the expected dtype and shape")
    groups: dict[str, int] = {}
    for plan in info.kernels.values():
        groups[plan] = groups.get(plan, 0) + 1
    for i, (plan, count) in enumerate(groups.items()):
        label = f"kernels ({info.kernel_device}, M={info.kernel_tokens})" if i == 0 else ""
        table.add_row(label, f"{count} linear{'s' if count != 1 else ''}: {plan}", end_section=False)
    out.print(table)


# ------------------------------------------------------------------------------------------- push
@app.command(
    epilog=_examples(
        "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4",
        "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4 --private --revision w4-g128",
    )
)
def push(
    folder: Annotated[Path, typer.Argument(help="A checkpoint folder written by `qdlm-export quantize`.")],
    repo_id: Annotated[str, typer.Argument(help="Target Hub repo, e.g. your-name/LLaDA-8B-Instruct-w4.")],
    private: Annotated[bool, typer.Option(help="Create the repo as private (if it does not exist yet).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to (created if missing) [default: main].")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="Commit message [default: a description of the checkpoint].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Upload a checkpoint to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)."""
    from .hub import push_checkpoint

    result = push_checkpoint(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    if as_json:
        typer.echo(json.dumps(result.__dict__, indent=2))
    else:
        out.print(f"Uploaded {folder} to {result.repo_url} (commit {result.commit_oid[:10]}): {result.commit_url}")


# ---------------------------------------------------------------------------------------- convert
@app.command(
    epilog=_examples(
        "qdlm-export convert llada-w4 --to compressed-tensors --out llada-w4-ct",
        "qdlm-export convert llada-w4 --to gptq --out llada-w4-gptq",
    )
)
def convert(
    folder: Annotated[Path, typer.Argument(help="A native checkpoint written by `qdlm-export quantize`.")],
    to: Annotated[str, typer.Option("--to", help="Target format: gptq, awq or compressed-tensors.")] = ...,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")] = ...,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB.")] = "5GB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert a native checkpoint to GPTQ, AWQ or compressed-tensors; refuses what the format cannot express."""
    from .convert import convert as run_convert

    from .inspect import read_quantization_config

    read_quantization_config(folder)  # a clear error if FOLDER is not a native checkpoint
    result = run_convert(folder, out_dir, to, overwrite=overwrite, max_shard_bytes=_parse_size(max_shard_size))
    if as_json:
        typer.echo(json.dumps({"out": str(result), "format": to}))
    else:
        out.print(f"Wrote {to} checkpoint {result}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------ bench
@app.command(
    epilog=_examples(
        "qdlm-export bench                  # kernels + a denoising step of the embedded default, W4",
        "qdlm-export bench llada-w4 --full --json",
    )
)
def bench(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(help="A quantized checkpoint for the denoising-step benchmark [default: the embedded tiny LLaDA, RTN W4 g128].")
    ] = None,
    full: Annotated[bool, typer.Option("--full/--quick", help="Every dLLM GEMM shape and token count, or a quick subset.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels/--no-kernels", help="Run the GEMM micro-benchmarks.")] = True,
    step: Annotated[bool, typer.Option("--step/--no-step", help="Time one full denoising step against the original model.")] = True,
    seqlen: Annotated[int, typer.Option(help="Sequence length of the denoising step.")] = 256,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [default: cuda when available].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Benchmark kernels at dLLM shapes and a full denoising step, as ratios to bf16 (fp32 on CPU) measured in the same run."""
    import tempfile

    result: dict = {}
    if kernels:
        from .bench import format_report, run_kernel_benchmarks

        result["kernels"] = run_kernel_benchmarks(quick=not full, device=device)
        if not as_json:
            out.print(format_report(result["kernels"]), highlight=False, soft_wrap=True)
    if step:
        from .bench_model import run_model_benchmark

        with tempfile.TemporaryDirectory() as tmp:
            target = checkpoint
            if target is None:
                from .quantize import make_config
                from .quantize import quantize as run_quantize

                target = Path(tmp) / "tiny-w4"
                run_quantize(str(EMBEDDED_DEFAULT), target, make_config("rtn"), trust_remote_code=True, verify=False)
            result["step"] = run_model_benchmark(target, seqlen=seqlen, device=device)
        if not as_json:
            s = result["step"]
            out.print(
                f"denoising step ({s['tokens']} tokens, {s['device']}): {s['dense_dtype']} {s['dense_step_ms']} ms, "
                f"{s['method']} W{s['bits']}{'A' + str(s['act_bits']) if s['act_bits'] else ''} {s['quantized_step_ms']} ms "
                f"-> speedup {s['speedup']}x; quantized linears hold {s['linear_memory_ratio']:.1%} of their bf16 bytes"
                + (f"; online Hadamard {s['hadamard_share']:.1%} of the step" if s["hadamard_share"] is not None else ""),
                highlight=False, soft_wrap=True,
            )
    if as_json:
        typer.echo(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------------- eval
@app.command(
    "eval",
    epilog=_examples(
        "qdlm-export eval tiny-w4                                   # bundled multiple-choice task, offline",
        "qdlm-export eval tiny-w4 --tasks qdlm_stdlib_mc,qdlm_stdlib_gen --limit 20 --json",
        "qdlm-export eval llada-w4 --tasks arc_easy,hellaswag --limit 200 --mc-num 128",
        "qdlm-export eval llada-w4 --tasks gsm8k -O gen_length=256 -O steps=256 -O block_length=32",
    ),
)
def eval_command(
    folder: Annotated[Path, typer.Argument(help="A quantized checkpoint folder written by `qdlm-export quantize`.")],
    tasks: Annotated[
        str,
        typer.Option(help="Comma-separated lm-eval tasks. Bundled offline tasks: qdlm_stdlib_mc, qdlm_stdlib_gen (tag qdlm_offline)."),
    ] = "qdlm_stdlib_mc",
    limit: Annotated[Optional[float], typer.Option(help="Examples per task (an int, or a fraction below 1) [default: all].")] = None,
    original: Annotated[
        Optional[str], typer.Option(help="The original model to compare against [default: the checkpoint's recorded source].")
    ] = None,
    mc_num: Annotated[int, typer.Option(help="Monte-Carlo masked copies per log-likelihood.")] = 32,
    batch_size: Annotated[Optional[int], typer.Option(help="Masked copies per forward pass [default: min(mc-num, 32)].")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per prompt [default: the task's].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the masks and of sampling (the same for both models).")] = 1234,
    nll: Annotated[bool, typer.Option("--nll/--no-nll", help="Also score the held-out masked-token NLL on the shipped corpus.")] = True,
    option: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", help="A qdlm model argument as KEY=VALUE (repeatable): gen_length, steps, block_length, alg, temperature, ... See docs/EVAL.md."),
    ] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option(help="A folder of extra lm-eval task YAMLs (repeatable).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [default: cuda when available].")] = None,
    dtype: Annotated[str, typer.Option(help="Dtype the models run in: auto, float32, bfloat16, float16.")] = "auto",
    write: Annotated[bool, typer.Option("--write/--no-write", help="Store the table in the folder's qdlm_report.json and model card.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Evaluate the original and the quantized model side by side with lm-eval (the `qdlm` dLLM model)."""
    from .eval.evaluate import evaluate_checkpoint, format_table, parse_model_args

    if limit is not None and limit >= 1:
        limit = int(limit)
    if not as_json:
        err.print(f"evaluating the original and {folder} on {tasks} ...", highlight=False)
    result = evaluate_checkpoint(
        folder, tasks, limit=limit, original=original, mc_num=mc_num, batch_size=batch_size,
        num_fewshot=num_fewshot, seed=seed, nll=nll, model_args=parse_model_args(option or []),
        include_path=[str(p) for p in include_path] if include_path else None, device=device, dtype=dtype,
        write=write,
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    out.print(format_table(result["table"]), highlight=False, soft_wrap=True)
    out.print(f"original: {result['original']}", highlight=False, soft_wrap=True)
    if write:
        where = {"regenerated": "qdlm_report.json and README.md", "kept": "qdlm_report.json (README.md was edited by hand: kept)"}
        out.print(f"wrote the table into {where.get(result['card'], 'qdlm_report.json')} of {folder}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------- main
def _render_error(message: str, hint: str | None, code: int) -> int:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, markup=True)
    if hint:
        err.print(f"[yellow]hint:[/yellow] {hint}", highlight=False)
    return code


def main() -> None:
    """Entry point: runs the app and maps every known failure to a message and exit code."""
    from .errors import QdlmError

    debug = os.environ.get("QDLM_DEBUG") == "1"
    try:
        code = app(standalone_mode=False)
        if code == 130:  # click turns Ctrl-C into Abort and returns its exit code
            sys.exit(_render_error("interrupted; no output was left behind", None, 130))
        if isinstance(code, int) and code:
            sys.exit(code)
    except QdlmError as exc:
        if debug:
            raise
        sys.exit(_render_error(exc.message, exc.hint, exc.exit_code))
    except KeyboardInterrupt:
        sys.exit(_render_error("interrupted; no output was left behind", None, 130))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(_render_error("aborted", None, 130))
    except Exception as exc:  # click usage errors carry their own exit code and message
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if debug:
            raise
        sys.exit(
            _render_error(
                f"internal error: {type(exc).__name__}: {exc}",
                "this is a bug in qdlm-export; re-run with QDLM_DEBUG=1 for the traceback and report it",
                3,
            )
        )


if __name__ == "__main__":
    main()
