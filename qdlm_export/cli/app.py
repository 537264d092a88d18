"""The ``qdlm-export`` command line: a thin Typer layer that parses, calls the library, and renders.

No logic lives here. Every user-fixable problem arrives as a ``QdlmError`` (or a usage error from
click) and leaves through :func:`main`'s one exception-to-message table; tracebacks appear only
with ``QDLM_DEBUG=1``.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..core.configs import ACT_GRANULARITIES, CALIB_MASKINGS, GROUP_FALLBACKS, MAX_SEED, SCALE_DTYPES
from ..exports.convert import FORMATS, TARGETS
from ..methods import available_methods

app = typer.Typer(
    name="qdlm-export",
    help="Quantize diffusion LLMs (LLaDA, Dream, ...) into Hub-ready checkpoints that reload with from_pretrained.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    # Plain help text: with rich markup, "[default: 4]" in a help string would be eaten as a tag.
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)

EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "assets" / "tiny-llada"

# Closed choices come from the registries they belong to; click lists them in --help and refuses
# anything else with the accepted values (exit 2, with the usage line).
MethodName = Literal[tuple(available_methods())]  # type: ignore[valid-type]
OutputFormat = Literal[FORMATS]  # type: ignore[valid-type]
ConvertTarget = Literal[TARGETS]  # type: ignore[valid-type]
ScaleDtype = Literal[SCALE_DTYPES]  # type: ignore[valid-type]
GroupFallback = Literal[GROUP_FALLBACKS]  # type: ignore[valid-type]
ActGranularity = Literal[ACT_GRANULARITIES]  # type: ignore[valid-type]
CalibMasking = Literal[CALIB_MASKINGS]  # type: ignore[valid-type]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
EvalDtype = Literal["auto", "float32", "bfloat16", "float16"]

# lm-eval also seeds numpy with --seed, and numpy takes 32 bits.
MAX_EVAL_SEED = 2**32 - 1


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


class _Interrupted(Exception):
    """A ``KeyboardInterrupt`` (Ctrl-C, or ``output.Terminated`` for SIGTERM/SIGHUP) carried past
    click, which would otherwise turn it into a bare exit code 130 and lose the signal number."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def _command(*args, **kwargs):
    """``app.command`` whose body hands interrupts to :func:`main` intact."""

    def decorate(func):
        @functools.wraps(func)
        def guarded(*a, **kw):
            try:
                return func(*a, **kw)
            except KeyboardInterrupt as exc:
                raise _Interrupted(exc) from exc

        return app.command(*args, **kwargs)(guarded)

    return decorate


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------ option validation
# transformers' convention (save_pretrained(max_shard_size=...)): KB/MB/GB/TB are powers of 10,
# KiB/MiB/GiB/TiB powers of 2, a plain number is bytes.
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
SIZE_HELP = "a positive size: 500MB or 5GB (powers of 10), 5GiB (powers of 2), or a number of bytes"


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """``"5GB"`` -> 5*10**9, ``"5GiB"`` -> 5*2**30, ``"123"`` -> 123 bytes. Anything else (zero,
    negative, non-finite, an unknown unit) -> ``ConfigError`` naming ``option``."""
    from ..errors import ConfigError

    match = _SIZE_RE.match(str(text))
    unit = match.group(2) if match else ""
    if match and unit[-1:] == "b" and not unit.upper().endswith("IB"):
        raise ConfigError(
            f"{option} {text!r}: a lowercase b means bits", hint=f"write bytes with a capital B; {option} takes {SIZE_HELP}"
        )
    if not match or unit.upper() not in _SIZE_UNITS:
        raise ConfigError(f"{option} {text!r} is not a size", hint=f"{option} takes {SIZE_HELP}")
    value = float(match.group(1)) * _SIZE_UNITS[unit.upper()]
    if not math.isfinite(value) or int(value) < 1:
        raise ConfigError(f"{option} {text!r} is not a positive size", hint=f"{option} takes {SIZE_HELP}")
    return int(value)


def _size_option(value: str) -> int:
    from ..errors import ConfigError

    try:
        return parse_size(value)
    except ConfigError as exc:
        bits = " (a lowercase b means bits; write B for bytes)" if "lowercase" in exc.message else ""
        raise typer.BadParameter(f"{value!r} is not {SIZE_HELP}{bits}") from None


def _int_range(low: int, high: Optional[int] = None, high_text: Optional[str] = None):
    """A callback refusing integers outside [low, high], naming the value and the accepted range."""
    accepted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high_text or high}"

    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and (value < low or (high is not None and value > high)):
            raise typer.BadParameter(f"{value} is out of range; accepted: {accepted}")
        return value

    return check


def _check_device(value: Optional[str], *, allow_auto: bool = True, need_available: bool = True) -> Optional[str]:
    if value is None:
        return None
    device = value.strip().lower()
    from ..core.arguments import DEVICE_PATTERN

    match = DEVICE_PATTERN.match(device)
    accepted = "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")
    if not match or (device == "auto" and not allow_auto):
        raise typer.BadParameter(f"{value!r} is not a device; accepted: {accepted}")
    if device.startswith("cuda") and need_available:
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter(
                f"{value} was asked for, but no CUDA device is available here; use cpu" + (" or auto" if allow_auto else "")
            )
        index = match.group(2)
        if index is not None and int(index) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise typer.BadParameter(f"{value}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return device


def _device_option(value: Optional[str]) -> Optional[str]:
    """quantize: cpu, cuda, cuda:N or auto."""
    return _check_device(value)


def _run_device_option(value: Optional[str]) -> Optional[str]:
    """bench and eval: cpu, cuda or cuda:N (nothing: cuda when available)."""
    return _check_device(value, allow_auto=False)


def _report_device_option(value: Optional[str]) -> Optional[str]:
    """inspect reports the kernels a device would use; the device need not be here."""
    return _check_device(value, allow_auto=False, need_available=False)


def _finite(value: Optional[float]) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _limit_option(value: Optional[float]) -> Optional[float]:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is invalid; accepted: a positive number of examples, or a fraction in (0, 1)")
    return value


# --------------------------------------------------------------------------------------- quantize
@_command(
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
        typer.Argument(metavar="MODEL", help="Local model folder or Hub id. Omitted: the tiny LLaDA embedded in the package (offline)."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")] = ...,
    method: Annotated[MethodName, typer.Option("--method", "-m", help="Quantization method (docs/METHODS.md).")] = "rtn",
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
        Optional[GroupFallback], typer.Option(help="When --group-size does not divide a layer's input size: refuse, or per-channel scales for that layer [default: error].")
    ] = None,
    scale_dtype: Annotated[
        Optional[ScaleDtype], typer.Option(help="Scale dtype [default: float32 for float32 models, else float16].")
    ] = None,
    act_bits: Annotated[Optional[int], typer.Option(help="Activation bits for weight-activation methods: 8 or 4 [default: the method's: 8 for smoothquant and rtn-wa, 4 for quarot and duquant].")] = None,
    act_granularity: Annotated[
        Optional[ActGranularity], typer.Option(help="Activation scales: 'token' (dynamic per token) or 'tensor' (static, calibrated) [default: token].")
    ] = None,
    qkv_bits: Annotated[Optional[int], typer.Option(help="Also quantize attention q/k/v outputs to 8 or 4 bits [default: off].")] = None,
    damp: Annotated[Optional[float], typer.Option(help="GPTQ/QuaRot dampening, a finite fraction >= 0 of mean(diag H) [default: 0.01].", callback=_finite)] = None,
    act_order: Annotated[Optional[bool], typer.Option("--act-order", help="GPTQ: visit columns by decreasing Hessian diagonal (static groups keep the layout kernel-friendly).", show_default=False)] = None,
    mse_clip: Annotated[Optional[bool], typer.Option("--mse-clip", help="GPTQ: search each group's clipping range by MSE.", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="SmoothQuant/DuQuant migration strength alpha, in [0, 1] [default: 0.5].", callback=_finite)] = None,
    option: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", help="Any other method option as KEY=VALUE (repeatable), e.g. -O block_size=64. See docs/METHODS.md."),
    ] = None,
    calib: Annotated[str, typer.Option(help="Calibration text: 'default' (shipped corpus), a .txt/.jsonl file, a folder, or a Hub dataset.")] = "default",
    calib_field: Annotated[str, typer.Option(help="JSONL/dataset field holding the text.")] = "text",
    nsamples: Annotated[int, typer.Option(help="Calibration sequences (at least 1).", callback=_int_range(1))] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence (at least 2).", callback=_int_range(2))] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling and masking, 0 to 2**63-1.", callback=_int_range(0, MAX_SEED, "2**63-1"))] = 0,
    calib_masking: Annotated[
        CalibMasking, typer.Option(help="'random': mask tokens with a per-sample ratio t~U(0,1), as dLLMs see them while denoising (measured better, docs/calibration.md); 'none': clean text, as the study did; 'auto': random for models with a mask token, else none.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (cuda when available).", callback=_device_option)] = "auto",
    compute_dtype: Annotated[
        Optional[ComputeDtype], typer.Option(help="Dtype blocks run in during calibration [default: float32 on CPU, bfloat16 on CUDA].")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Calibration sequences per forward pass (at least 1).", callback=_int_range(1))] = 8,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard: 5GB = 5*10^9 bytes, 5GiB = 5*2^30 bytes, a plain number is bytes.", callback=_size_option)
    ] = "5GB",
    output_format: Annotated[
        OutputFormat, typer.Option("--format", help="Output format (see docs/EXPORTS.md).")
    ] = "native",
    self_contained: Annotated[
        bool, typer.Option(help="Native checkpoints of remote-code models carry the loader, so they load without qdlm-export.")
    ] = True,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the model's own modeling code (LLaDA, Dream). Review it first.")
    ] = False,
    allow_non_finite: Annotated[
        bool, typer.Option("--allow-non-finite", help="Keep going when source weights contain NaN/Inf (refused by default).", show_default=False)
    ] = False,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of MODEL.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option(help="Reload the result and measure its output error against the original.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Quantize MODEL and write a checkpoint that reloads with from_pretrained."""
    from ..core.configs import CalibrationConfig
    from ..quantize.api import make_config
    from ..quantize.api import quantize as run_quantize

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
            verify=verify, max_shard_bytes=max_shard_size, revision=revision,
            on_block=on_block, command=command, output_format=output_format, self_contained=self_contained,
            **({"allow_non_finite": True} if allow_non_finite else {}),  # the library's default otherwise
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
    for repair in summary.compat_repairs:  # the model's own code, repaired in memory (families/compat.py)
        out.print(f"Repaired for this transformers: {repair}", soft_wrap=True, highlight=False)
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

    from ..errors import ConfigError
    from ..methods import method_class

    config_class = method_class(method).config_class
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    parsed: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"-O {pair!r} is not KEY=VALUE", hint=f"write it like -O block_size=64; {method} accepts: {', '.join(sorted(fields))}")
        if key not in fields:
            raise ConfigError(
                f"-O {key}: no such option for method {method!r}", hint=f"{method} accepts: {', '.join(sorted(fields))}"
            )
        parsed[key] = _coerce(key, raw.strip(), hints.get(key, str))
    return parsed


def _coerce(key: str, raw: str, hint: object) -> object:
    from ..errors import ConfigError

    text = str(hint).replace("typing.", "")
    nullable = "None" in text or "Optional" in text
    if raw.lower() in ("none", "null") and nullable:
        return None
    accepts = " (or none)" if nullable else ""
    if "bool" in text:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"-O {key}={raw!r} is not a boolean", hint=f"{key} accepts true or false{accepts}")
    if "int" in text and "float" not in text:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"-O {key}={raw!r} is not an integer", hint=f"{key} accepts an integer{accepts}") from None
    if "float" in text:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"-O {key}={raw!r} is not a number", hint=f"{key} accepts a finite number{accepts}") from None
        if not math.isfinite(value):
            raise ConfigError(f"-O {key}={raw!r} is not a finite number", hint=f"{key} accepts a finite number{accepts}")
        return value
    return raw


# ---------------------------------------------------------------------------------------- inspect
@_command(epilog=_examples("qdlm-export inspect llada-w4", "qdlm-export inspect llada-w4 --json"))
def inspect(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="A checkpoint folder written by `qdlm-export quantize`.")],
    device: Annotated[
        Optional[str],
        typer.Option(help="Device to report kernel backends for: cpu, cuda or cuda:N [default: cuda when available].", callback=_report_device_option),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Rows (batch x sequence) to report kernel backends for (at least 1).", callback=_int_range(1))] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Describe a checkpoint, validate that every promised tensor exists with the right dtype and shape,
    and show which kernel backend each layer would use (reads headers only; never runs model code)."""
    from ..format.validation import inspect_checkpoint

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
@_command(
    epilog=_examples(
        "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4",
        "qdlm-export push llada-w4 me/LLaDA-8B-Instruct-qdlm-w4 --private --revision w4-g128",
    )
)
def push(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="A checkpoint folder written by `qdlm-export quantize`.")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Target Hub repo, e.g. your-name/LLaDA-8B-Instruct-w4.")],
    private: Annotated[bool, typer.Option(help="Create the repo as private (if it does not exist yet).")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to (created if missing) [default: main].")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="Commit message [default: a description of the checkpoint].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Upload a checkpoint to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)."""
    from ..hub.push import push_checkpoint

    result = push_checkpoint(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    if as_json:
        typer.echo(json.dumps(result.__dict__, indent=2))
    else:
        out.print(f"Uploaded {folder} to {result.repo_url} (commit {result.commit_oid[:10]}): {result.commit_url}")


# ---------------------------------------------------------------------------------------- convert
@_command(
    epilog=_examples(
        "qdlm-export convert llada-w4 --to compressed-tensors --out llada-w4-ct",
        "qdlm-export convert llada-w4 --to gptq --out llada-w4-gptq",
    )
)
def convert(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="A native checkpoint written by `qdlm-export quantize`.")],
    to: Annotated[ConvertTarget, typer.Option("--to", help="Target format.")] = ...,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")] = ...,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard: 5GB = 5*10^9 bytes, 5GiB = 5*2^30 bytes, a plain number is bytes.", callback=_size_option)
    ] = "5GB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert a native checkpoint to GPTQ, AWQ or compressed-tensors; refuses what the format cannot
    express (tensors and configs only; never runs model code)."""
    from ..exports.convert import convert as run_convert

    from ..format.validation import read_quantization_config

    read_quantization_config(folder)  # a clear error if FOLDER is not a native checkpoint
    result = run_convert(folder, out_dir, to, overwrite=overwrite, max_shard_bytes=max_shard_size)
    if as_json:
        typer.echo(json.dumps({"out": str(result), "format": to}))
    else:
        out.print(f"Wrote {to} checkpoint {result}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------ bench
@_command(
    epilog=_examples(
        "qdlm-export bench                  # kernels + a denoising step of the embedded default, W4",
        "qdlm-export bench llada-w4 --trust-remote-code --full --json",
    )
)
def bench(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(metavar="CHECKPOINT", help="A quantized checkpoint for the denoising-step benchmark [default: the embedded tiny LLaDA, RTN W4 g128].")
    ] = None,
    full: Annotated[bool, typer.Option("--full/--quick", help="Every dLLM GEMM shape and token count, or a quick subset.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels/--no-kernels", help="Run the GEMM micro-benchmarks.")] = True,
    step: Annotated[bool, typer.Option("--step/--no-step", help="Time one full denoising step against the original model.")] = True,
    seqlen: Annotated[int, typer.Option(help="Sequence length of the denoising step (at least 1).", callback=_int_range(1))] = 256,
    device: Annotated[
        Optional[str], typer.Option(help="cpu, cuda or cuda:N [default: cuda when available].", callback=_run_device_option)
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the checkpoint's and its original's own modeling code (LLaDA, Dream). Review it first.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Benchmark kernels at dLLM shapes and a full denoising step, as ratios to bf16 (fp32 on CPU) measured in the same run."""
    import tempfile

    result: dict = {}
    if step and checkpoint is not None:  # refuse untrusted code or a broken checkpoint before minutes of kernel timing
        from ..bench.model import check_checkpoint

        check_checkpoint(checkpoint, trust_remote_code)
    if kernels:
        from ..bench.kernels import format_report, run_kernel_benchmarks

        result["kernels"] = run_kernel_benchmarks(quick=not full, device=device)
        if not as_json:
            out.print(format_report(result["kernels"]), highlight=False, soft_wrap=True)
    if step:
        from ..bench.model import run_model_benchmark

        with tempfile.TemporaryDirectory() as tmp:
            target, trusted = checkpoint, trust_remote_code
            if target is None:
                from ..quantize.api import make_config
                from ..quantize.api import quantize as run_quantize

                target, trusted = Path(tmp) / "tiny-w4", True  # made here from our own shipped code
                run_quantize(str(EMBEDDED_DEFAULT), target, make_config("rtn"), trust_remote_code=True, verify=False)
            result["step"] = run_model_benchmark(target, seqlen=seqlen, device=device, trust_remote_code=trusted)
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
@_command(
    "eval",
    epilog=_examples(
        "qdlm-export eval tiny-w4 --trust-remote-code               # bundled multiple-choice task, offline",
        "qdlm-export eval tiny-w4 --trust-remote-code --tasks qdlm_stdlib_mc,qdlm_stdlib_gen --limit 20 --json",
        "qdlm-export eval llada-w4 --trust-remote-code --tasks arc_easy,hellaswag --limit 200 --mc-num 128",
        "qdlm-export eval llada-w4 --trust-remote-code --tasks gsm8k -O gen_length=256 -O steps=256 -O block_length=32",
    ),
)
def eval_command(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="A quantized checkpoint folder written by `qdlm-export quantize`.")],
    tasks: Annotated[
        str,
        typer.Option(help="Comma-separated lm-eval tasks. Bundled offline tasks: qdlm_stdlib_mc, qdlm_stdlib_gen (tag qdlm_offline)."),
    ] = "qdlm_stdlib_mc",
    limit: Annotated[
        Optional[float], typer.Option(help="Examples per task (an int, or a fraction below 1) [default: all].", callback=_limit_option)
    ] = None,
    original: Annotated[
        Optional[str], typer.Option(help="The original model to compare against [default: the checkpoint's recorded source].")
    ] = None,
    mc_num: Annotated[int, typer.Option(help="Monte-Carlo masked copies per log-likelihood (at least 1).", callback=_int_range(1))] = 32,
    batch_size: Annotated[Optional[int], typer.Option(help="Masked copies per forward pass, at least 1 [default: min(mc-num, 32)].", callback=_int_range(1))] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per prompt, 0 or more [default: the task's].", callback=_int_range(0))] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the masks and of sampling (the same for both models), 0 to 2**32-1.", callback=_int_range(0, MAX_EVAL_SEED, "2**32-1"))
    ] = 1234,
    nll: Annotated[bool, typer.Option("--nll/--no-nll", help="Also score the held-out masked-token NLL on the shipped corpus.")] = True,
    option: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", help="A qdlm model argument as KEY=VALUE (repeatable): gen_length, steps, block_length, alg, temperature, ... See docs/EVAL.md."),
    ] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option(help="A folder of extra lm-eval task YAMLs (repeatable).")] = None,
    device: Annotated[
        Optional[str], typer.Option(help="cpu, cuda or cuda:N [default: cuda when available].", callback=_run_device_option)
    ] = None,
    dtype: Annotated[EvalDtype, typer.Option(help="Dtype the models run in.")] = "auto",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the checkpoint's and its original's own modeling code (LLaDA, Dream). Review it first.")
    ] = False,
    write: Annotated[bool, typer.Option("--write/--no-write", help="Store the table in the folder's qdlm_report.json and model card.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Evaluate the original and the quantized model side by side with lm-eval (the `qdlm` dLLM model)."""
    from ..eval.evaluate import evaluate_checkpoint, format_table, parse_model_args

    if limit is not None and limit >= 1:
        limit = int(limit)
    model_args = parse_model_args(option or [])
    if not as_json:
        err.print(f"evaluating the original and {folder} on {tasks} ...", highlight=False)
    result = evaluate_checkpoint(
        folder, tasks, limit=limit, original=original, mc_num=mc_num, batch_size=batch_size,
        num_fewshot=num_fewshot, seed=seed, nll=nll, model_args=model_args,
        include_path=[str(p) for p in include_path] if include_path else None, device=device, dtype=dtype,
        write=write, trust_remote_code=trust_remote_code,
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
    err.print("[bold red]error:[/bold red] ", end="", highlight=False)
    err.print(message, highlight=False, markup=False, soft_wrap=True)
    if hint:
        err.print("[yellow]hint:[/yellow] ", end="", highlight=False)
        err.print(hint, highlight=False, markup=False, soft_wrap=True)
    return code


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """click's exception base as Typer raises it: Typer 0.29 bundles its own copy of click (its
    ``ClickException`` is not ``click.ClickException``); older Typers use click itself. Found through
    ``typer.BadParameter``'s ancestry, so either layout works."""
    found: list[type[BaseException]] = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:  # pragma: no cover - Typer without a separate click
        pass
    return tuple(dict.fromkeys(found))


def _exit_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [typer.Exit]
    try:
        import click

        found.append(click.exceptions.Exit)
    except ImportError:  # pragma: no cover
        pass
    return tuple(dict.fromkeys(found))


def _abort_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        found.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover
        pass
    return tuple(dict.fromkeys(found))


def _attach_usage_context(exc: BaseException) -> None:
    """click's parser raises some usage errors ("Option '--out' requires an argument") without the
    command's context, so they would print without the usage line: rebuild it from the command line."""
    if not hasattr(exc, "ctx") or exc.ctx is not None:
        return
    try:
        group = typer.main.get_command(app)
        ctx = type(group).context_class(group, info_name="qdlm-export", **group.context_settings)
        for arg in sys.argv[1:]:
            sub = None if arg.startswith("-") else group.get_command(ctx, arg)
            if sub is not None:
                ctx = type(sub).context_class(sub, info_name=arg, parent=ctx)
                break
        exc.ctx, exc.cmd = ctx, ctx.command
    except Exception:  # pragma: no cover - the message still shows, only without the usage line
        pass


# errno -> (what happened, what to do next). The message names the path from the exception.
_RESOURCE_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose an --out on another disk, then run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose an --out on another disk, then run again"),
    errno.EROFS: ("read-only file system", "choose an --out on a writable file system"),
    errno.EACCES: ("permission denied", "check the permissions of that path, or choose another folder"),
    errno.EPERM: ("operation not permitted", "check the permissions of that path, or choose another folder"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path; a folder was expected there"),
    errno.EISDIR: ("is a folder, not a file", "check the path; a file was expected there"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
    errno.EXDEV: ("cannot move across file systems", "choose an --out on the same disk as its parent folder"),
}

_OOM_MARKERS = ("bad_alloc", "DefaultCPUAllocator: can't allocate", "out of memory", "not enough memory",
                "Cannot allocate memory")
# What shrinks memory depends on the command that ran out of it.
_OOM_HINTS = {
    "quantize": "use fewer or shorter calibration sequences (--nsamples, --seqlen), a smaller --batch-size, "
    "or a machine with more memory",
    "eval": "use a smaller --mc-num or --batch-size, or a machine with more memory",
    "bench": "use a shorter --seqlen or --quick, or a machine with more memory",
}
_OOM_HINT_OTHER = "free memory (close other programs) or use a machine with more memory"


def _oom_hint() -> str:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    return _OOM_HINTS.get(command or "", _OOM_HINT_OTHER)


def _out_from_argv() -> str | None:
    """The ``--out`` of this command line, to name where a write failed when the OS did not say."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg in ("--out", "-o") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def _os_error_message(exc: OSError) -> tuple[str, str]:
    what, hint = _RESOURCE_ERRORS.get(exc.errno or -1, (exc.strerror or type(exc).__name__, ""))
    paths = [p for p in (exc.filename, getattr(exc, "filename2", None)) if p is not None]
    where = " -> ".join(os.fsdecode(p) if isinstance(p, (bytes, os.PathLike)) else str(p) for p in paths)
    if where:
        return f"{what} at {where}", hint or "check that path"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and _out_from_argv():
        return f"{what} while writing --out {_out_from_argv()}", hint
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"network error: {exc}", "check the connection (or set HF_HUB_OFFLINE=1 for local models) and run again"
    detail = str(exc)
    return (f"{what}: {detail}" if detail and detail != what else what), hint or "check the files and folders involved"


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)


def _interrupted_code(exc: BaseException) -> int:
    signum = getattr(exc, "signum", None)
    return 128 + int(signum) if isinstance(signum, int) and signum > 0 else 130


def main() -> None:
    """Entry point: runs the app and maps every known failure to a message and exit code."""
    from ..errors import QdlmError

    debug = os.environ.get("QDLM_DEBUG") == "1"
    try:
        code = app(standalone_mode=False, prog_name="qdlm-export")
        if code == 130:  # click turns a Ctrl-C outside a command into exit code 130
            sys.exit(_render_error("interrupted; no output was left behind", None, 130))
        if isinstance(code, int) and code:
            sys.exit(code)
    except SystemExit:
        raise
    except _Interrupted as exc:
        sys.exit(_render_error("interrupted; no output was left behind", None, _interrupted_code(exc.original)))
    except KeyboardInterrupt as exc:
        sys.exit(_render_error("interrupted; no output was left behind", None, _interrupted_code(exc)))
    except QdlmError as exc:
        if debug:
            raise
        sys.exit(_render_error(exc.message, exc.hint, exc.exit_code))
    except _exit_types() as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _abort_types():
        sys.exit(_render_error("aborted", None, 130))
    except _usage_error_types() as exc:  # usage errors: click renders the usage line and the option
        _attach_usage_context(exc)
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:
        if debug:
            raise
        if exc.errno == errno.EPIPE:  # the reader of our output went away (| head)
            sys.exit(1)
        message, hint = _os_error_message(exc)
        sys.exit(_render_error(message, hint, 1))
    except Exception as exc:
        if debug:
            raise
        if _is_out_of_memory(exc):
            sys.exit(_render_error(f"out of memory ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})", _oom_hint(), 1))
        sys.exit(
            _render_error(
                f"internal error: {type(exc).__name__}: {exc}",
                "this is a bug in qdlm-export; re-run with QDLM_DEBUG=1 for the traceback and report it",
                3,
            )
        )


if __name__ == "__main__":
    main()
