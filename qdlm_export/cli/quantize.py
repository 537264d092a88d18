"""``qdlm-export quantize``: options -> a method config and a calibration config -> the library's
``quantize()``, with progress bars (tokenizing, blocks, verifying, converting) and a summary table."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.table import Table

from ..core.configs import CALIB_ATTENTIONS, MAX_SEED
from .console import human_size, out
from .options import (
    EMBEDDED_DEFAULT,
    ActGranularity,
    CalibMasking,
    ComputeDtype,
    GroupFallback,
    JsonSummary,
    MaxShardSize,
    MethodName,
    OutDir,
    OutputFormat,
    Overwrite,
    ScaleDtype,
    device_option,
    examples,
    finite,
    int_range,
)
from .recipe import load_recipe, resolved_recipe
from .progress_bars import progress_bars

CalibAttention = Literal[CALIB_ATTENTIONS]  # type: ignore[valid-type]

EXAMPLES = examples(
    "qdlm-export quantize --out tiny-w4    # the embedded tiny LLaDA, RTN W4 g128",
    "qdlm-export quantize GSAI-ML/LLaDA-8B-Instruct --trust-remote-code --method gptq --bits 4 --out llada-w4",
    "qdlm-export quantize ./my-model --bits 8 --group-size -1 --asymmetric --out my-model-w8",
    "qdlm-export quantize --method quarot --bits 4 --act-bits 4 --out tiny-w4a4",
)


def quantize(
    ctx: typer.Context,
    model: Annotated[
        Optional[str],
        typer.Argument(metavar="MODEL", help="Local model folder or Hub id. Omitted: the tiny LLaDA embedded in the package (offline)."),
    ] = None,
    out_dir: OutDir = ...,
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
    include_router: Annotated[Optional[bool], typer.Option("--include-router", help="Mixture-of-experts models: also quantize the routers (kept in full precision by default; only where a router is a linear layer).", show_default=False)] = None,
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
    damp: Annotated[Optional[float], typer.Option(help="GPTQ/QuaRot dampening, a finite fraction >= 0 of mean(diag H) [default: 0.01].", callback=finite)] = None,
    act_order: Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", help="GPTQ: visit columns by decreasing Hessian diagonal (static groups keep the layout kernel-friendly) [default: on].", show_default=False)] = None,
    mse_clip: Annotated[Optional[bool], typer.Option("--mse-clip", help="GPTQ: search each group's clipping range by MSE.", show_default=False)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="SmoothQuant/DuQuant migration strength alpha, in [0, 1] [default: 0.5].", callback=finite)] = None,
    option: Annotated[
        Optional[list[str]],
        typer.Option("--option", "-O", help="Any other method option as KEY=VALUE (repeatable), e.g. -O block_size=64. See docs/METHODS.md."),
    ] = None,
    calib: Annotated[str, typer.Option(help="Calibration data: 'default' (shipped corpus), a .txt/.jsonl file, a folder of text files, a json/csv/tsv/parquet/arrow file or save_to_disk folder, or a Hub dataset id (docs/calibration.md; datasets need pip install \"qdlm-export[calib]\").")] = "default",
    calib_field: Annotated[Optional[str], typer.Option(help="The column (JSONL field) holding the text [default: 'text' when present, else the only string column].")] = None,
    calib_config: Annotated[Optional[str], typer.Option(help="Configuration name of a Hub dataset, e.g. wikitext-2-raw-v1.")] = None,
    calib_split: Annotated[str, typer.Option(help="Dataset split, with datasets' slicing syntax, e.g. 'train[:2000]'.")] = "train",
    calib_chat_template: Annotated[
        bool, typer.Option("--calib-chat-template", help="Render instruction data (a messages column, or prompt/response columns) with the model's chat template.", show_default=False)
    ] = False,
    nsamples: Annotated[int, typer.Option(help="Calibration sequences (at least 1).", callback=int_range(1))] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence (at least 2).", callback=int_range(2))] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling and masking, 0 to 2**63-1.", callback=int_range(0, MAX_SEED, "2**63-1"))] = 0,
    calib_masking: Annotated[
        CalibMasking, typer.Option(help="'random': mask tokens with a per-sample ratio t~U(0,1), as dLLMs see them while denoising (measured better, docs/calibration.md); 'none': clean text, as the study did; 'auto': random for models with a mask token, else none.")
    ] = "auto",
    calib_attention: Annotated[
        CalibAttention, typer.Option(help="Attention pattern of the calibration windows: 'block-causal': bidirectional inside a block, causal across blocks, with a random current block partly masked, as block-diffusion models (LLaDA2) sample; 'causal': token-causal, as autoregressive calibrators use; 'full': bidirectional (LLaDA, Dream); 'denoising': a clean context through the causal encoder and a noised canvas through the decoder, as DiffusionGemma samples ('causal' there: the encoder alone); 'auto': denoising for DiffusionGemma, block-causal for block-diffusion models, else full (docs/calibration.md).")
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (cuda when available).", callback=device_option)] = "auto",
    compute_dtype: Annotated[
        Optional[ComputeDtype], typer.Option(help="Dtype blocks run in during calibration [default: float32 on CPU, bfloat16 on CUDA].")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Calibration sequences per forward pass (at least 1).", callback=int_range(1))] = 8,
    max_shard_size: MaxShardSize = "5GB",
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
    overwrite: Overwrite = False,
    verify: Annotated[bool, typer.Option(help="Reload the result and measure its output error against the original.")] = True,
    as_json: JsonSummary = False,
    recipe: Annotated[
        Optional[Path],
        typer.Option("--config", metavar="RECIPE.yaml", is_eager=True, callback=load_recipe,
                     help="A recipe: these options in YAML (a checkpoint's qdlm_recipe.yaml reproduces it); flags given here win."),
    ] = None,
) -> None:
    """Quantize MODEL and write a checkpoint that reloads with from_pretrained."""
    params = dict(locals())  # every option as given (or from --config), for the checkpoint's recipe
    from ..core.configs import CalibrationConfig
    from ..quantize.api import make_config
    from ..quantize.api import quantize as run_quantize

    if model is None:
        model, trust_remote_code = str(EMBEDDED_DEFAULT), True  # our own shipped code
    given = dict(
        bits=bits, group_size=group_size, symmetric=symmetric, include_lm_head=include_lm_head,
        include_router=include_router, group_fallback=group_fallback, scale_dtype=scale_dtype, act_bits=act_bits, act_granularity=act_granularity,
        qkv_bits=qkv_bits, damp=damp, act_order=act_order, mse_clip=mse_clip, alpha=alpha,
    )
    options = {k: v for k, v in given.items() if v is not None}
    options.update(parse_options(method, option or []))
    config = make_config(method, **options)
    calibration = CalibrationConfig(
        source=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, masking=calib_masking, text_field=calib_field,
        dataset_config=calib_config, split=calib_split, chat_template=calib_chat_template, attention=calib_attention,
    )
    command = "qdlm-export " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    from ..quantize.pipeline import default_compute_dtype, resolve_device

    resolved_dtype = compute_dtype or str(default_compute_dtype(resolve_device(device))).removeprefix("torch.")
    written_recipe = resolved_recipe(ctx, params, config, resolved_dtype)
    with progress_bars(disable=as_json):  # tokenizing, every block, verifying, converting
        summary = run_quantize(
            model, out_dir, config, calibration=calibration, trust_remote_code=trust_remote_code,
            overwrite=overwrite, device=device, compute_dtype=compute_dtype, batch_size=batch_size,
            verify=verify, max_shard_bytes=max_shard_size, revision=revision,
            command=command, output_format=output_format, self_contained=self_contained,
            recipe=written_recipe,
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
    table.add_row("linear weights", f"{human_size(summary.linear_bytes_original)} -> {human_size(summary.linear_bytes_quantized)} ({ratio:.1%})")
    table.add_row("checkpoint", f"{human_size(summary.source_checkpoint_bytes)} -> {human_size(summary.checkpoint_bytes)}")
    if summary.relative_output_error is not None:
        table.add_row("relative output error", f"{summary.relative_output_error:.4f} (logits vs original, {summary.verification_inputs})")
    table.add_row("time", f"{summary.elapsed_s:.1f} s")
    out.print(table)
    for repair in summary.compat_repairs:  # the model's own code, repaired in memory (families/compat.py)
        out.print(f"Repaired for this transformers: {repair}", soft_wrap=True, highlight=False)
    out.print(f"Next: qdlm-export inspect {summary.out}", soft_wrap=True, highlight=False)
    out.print(f"      qdlm-export push {summary.out} YOUR_NAME/REPO", soft_wrap=True, highlight=False)


def parse_options(method: str, pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings -> typed method options, typed by the method config's fields."""
    import dataclasses
    import typing

    from ..errors import ConfigError
    from ..methods import config_class as method_config_class

    config_class = method_config_class(method)
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
