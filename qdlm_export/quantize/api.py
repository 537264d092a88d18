"""``quantize()``: source model + method config + calibration -> a complete, verified checkpoint folder.

The order is the contract: validate everything that can be validated before any heavy work, write
into a staged temporary folder, verify the written result by reloading it, then move it into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
import tempfile
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from .block_calibration import attention_mask
from .calibration import calibration_tokens, check_calibration_fits
from ..core.configs import CalibrationConfig, WeightOnlyConfig
from ..errors import ArgumentTypeError, ConfigError, InputDataError, ModelNotFoundError
from ..format.config_schema import build_quantization_config
from ..format.report import build_report, public_command, public_name, record_local_source, write_report
from ..format.spec import DTYPES, ST_FLOAT_DTYPES, dtype_name
from ..format.stacked_experts import StackingSink, shared_stack_section
from ..format.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, TeeSink
from ..methods import build_method, make_config  # noqa: F401  (make_config: part of this API)
from ..format.output import check_output
from ..format.staging import staged_output
from .pipeline import build_quantized_linear, default_compute_dtype, resolve_device, run_pipeline
from .source import SourceModel

logger = logging.getLogger(__name__)
RECIPE_FILE = "qdlm_recipe.yaml"  # the command line's resolved options (cli/recipe.py)


@dataclass
class QuantizeSummary:
    out: Path
    method: str
    bits: int
    group_size: int
    act_bits: int | None
    quantized_modules: int
    bits_per_weight: float
    linear_bytes_original: int
    linear_bytes_quantized: int
    checkpoint_bytes: int
    source_checkpoint_bytes: int
    relative_output_error: float | None
    elapsed_s: float
    compat_repairs: list[str] = dataclasses.field(default_factory=list)  # families/compat.py, as applied
    verification_inputs: str = ""  # what the verification logits were computed on, e.g. "4 masked samples"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out"] = str(self.out)
        return d


def quantize(
    model: str,
    out: str | Path,
    config: WeightOnlyConfig,
    *,
    calibration: CalibrationConfig | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    compute_dtype: str | None = None,
    batch_size: int = 8,
    verify: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    revision: str | None = None,
    on_block: Callable[[int, int], None] | None = None,
    command: str | None = None,
    output_format: str = "native",
    self_contained: bool = True,
    allow_non_finite: bool = False,
    recipe: dict[str, Any] | None = None,
) -> QuantizeSummary:
    """Quantize ``model`` into ``out``.

    ``output_format`` other than native: each quantized linear is converted as it is produced, from
    memory (exports/streaming.py); what the format cannot express is refused before any work where it
    can be known from the options and the weights' shapes. With ``verify`` the native checkpoint is
    also written, into a scratch folder, solely for verification to reload (then deleted); without it
    no native weights are written at all. ``self_contained``: native checkpoints carry the loader as
    remote code, so they load with transformers alone; without it they refuse to load where qdlm-export
    is not installed (formats/native_wrappers.py). Never random weights either way.
    ``allow_non_finite``: quantize source weights that hold NaN/Inf instead of refusing them.
    ``recipe``: the options that made this run, written as ``qdlm_recipe.yaml`` (no absolute paths).
    """
    from ..exports.convert import FORMATS, check_convertible

    _check_argument_types(
        model=model, out=out, config=config, calibration=calibration, trust_remote_code=trust_remote_code,
        overwrite=overwrite, device=device, compute_dtype=compute_dtype, batch_size=batch_size, verify=verify,
        max_shard_bytes=max_shard_bytes, revision=revision, on_block=on_block, command=command,
        output_format=output_format, self_contained=self_contained, allow_non_finite=allow_non_finite,
    )
    if recipe is not None and not isinstance(recipe, dict):
        raise ArgumentTypeError(f"quantize() argument recipe={recipe!r} is not a dict or None", hint="pass recipe as a dict")
    started = time.perf_counter()
    local_source = Path(model).expanduser() if isinstance(model, (str, Path)) else None
    out = check_output(out, overwrite, source=local_source if local_source and local_source.exists() else None)
    if output_format not in FORMATS:
        raise ConfigError(f"--format {output_format!r} is unknown", hint=f"choose one of {', '.join(FORMATS)}")
    if output_format in ("gptq", "awq") and config.scale_dtype is None:
        config = dataclasses.replace(config, scale_dtype="float16")  # what their loaders expect
    export_qconfig = None  # the native quantization_config as known before quantizing
    if output_format != "native":
        export_qconfig = {
            "weights": {"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric,
                        **({"scale_dtype": config.scale_dtype} if config.scale_dtype else {})},
            "activations": config.activations() if hasattr(config, "activations") else None,
        }
        check_convertible(export_qconfig, output_format)
    calibration = calibration or CalibrationConfig()
    torch_device = resolve_device(device)
    dtype = DTYPES[compute_dtype] if compute_dtype else default_compute_dtype(torch_device)

    from ..families import compat

    compat.reset_log()  # the repairs this run needs are listed in its report
    logger.info("Opening %s", model)
    source = SourceModel.open(
        str(model), trust_remote_code=trust_remote_code, revision=revision, allow_non_finite=allow_non_finite
    )
    try:
        if config.include_router:
            source.adapter = _router_quantized(source)
        method = build_method(config, source.adapter, source.config_dict, scale_dtype=_scale_dtype(config, source),
                              quantized_linear=build_quantized_linear)
        planned = _check_layer_shapes(source, method)
        if export_qconfig is not None:  # the module list, overrides and shapes, before any heavy work
            export_qconfig.update(quantized_modules=[m.name for m in planned], module_overrides=dict(method.overrides))
            fused_spec = source.adapter.fused_experts
            if fused_spec is not None:  # the targets' refusals of fused experts, before any work
                export_qconfig["fused_experts"] = {
                    f"{source.adapter.block_prefix(i)}.{fused_spec.module}": {}
                    for i in range(source.adapter.num_layers(source.config_dict))}
            check_convertible(export_qconfig, output_format, planned)
        if source.trust_remote_code and source.config_dict.get("auto_map"):
            from .preflight import run_first_block

            run_first_block(source, torch_device)  # the model's own code runs, finitely, before any work
        block_length = source.adapter.block_length
        denoising = source.adapter.shared_stack is not None  # the encoder/decoder walk (quantize/paired_walk.py)
        # a pattern the family cannot take: refused
        attention = calibration.resolved_attention(block_length, denoising=denoising)
        if method.needs_calibration:
            check_calibration_fits(calibration, source.adapter, source.config_dict, device=torch_device, dtype=dtype)
        tokenizer = _tokenizer(source) if (method.needs_calibration or verify) else None
        mask_id = source.adapter.mask_token_id(source.config_dict)
        calibration = dataclasses.replace(calibration, masking=calibration.resolved_masking(mask_id),
                                          attention=attention)
        calib_tokens = calib_mask = None
        if method.needs_calibration:
            logger.info("Tokenizing calibration text (%s): %d x %d tokens, %s attention", calibration.source,
                        calibration.nsamples, calibration.seqlen, attention)
            if denoising:  # clean text windows; the pipeline noises their canvases the way the sampler does
                calib_tokens = calibration_tokens(tokenizer, dataclasses.replace(calibration, attention="full"))
            else:
                calib_tokens = calibration_tokens(tokenizer, calibration, mask_id, block_length)
                calib_mask = attention_mask(attention, calibration.seqlen, block_length, dtype=dtype)
        logger.info("Quantizing %d blocks with %s (%d-bit, group %d)", source.adapter.num_layers(source.config_dict),
                    config.method, config.bits, config.group_size)

        with staged_output(out, overwrite, source=source.path) as stage:
            # Non-native formats are converted linear by linear into the stage; the native checkpoint
            # goes to a scratch folder, and only when verification will reload it.
            native = output_format == "native"
            tmp = stage if native else Path(tempfile.mkdtemp(prefix=".native-", dir=stage))
            writer = ShardedWriter(tmp, max_shard_bytes) if native or verify else None
            # fused 3-D experts (DiffusionGemma): each block's per-expert results stacked back (docs/FORMAT.md)
            stacking = (StackingSink.for_model(writer, source.adapter, source.config_dict)
                        if writer is not None and source.adapter.fused_experts is not None else None)
            export = None
            if not native:
                from ..exports.streaming import ConvertingSink

                export = ConvertingSink(stage, output_format, export_qconfig, max_shard_bytes=max_shard_bytes)
            result = run_pipeline(
                source, method, TeeSink(*(s for s in (stacking or writer, export) if s is not None)),
                calib_tokens=calib_tokens, device=torch_device, compute_dtype=dtype, batch_size=batch_size,
                on_block=on_block, calib_attention_mask=calib_mask,
                denoising=(("encoder" if attention == "causal" else "denoising", calibration.seed)
                           if denoising else None),
            )
            fused = stacking.finish() if stacking is not None else None
            shards = writer.close() if writer is not None else []
            if export is not None:
                shards = export.close()  # the folder's size is the export's
            for f in source.copyable_files():
                shutil.copy2(f, tmp / f.name)
            qconfig = _quantization_config(config, source, result, calibration, method, command, fused)
            config_dict = dict(source.config_dict)
            config_dict["quantization_config"] = qconfig
            (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
            if export is not None:
                export.check(qconfig)  # what the method added (online transforms...), before verification
            if native:  # before verification, so it loads the layout that ships
                from ..loader.native_wrappers import wrap_native

                wrap_native(tmp)  # a dense family's own model type: never random weights without the tool

            error, verified_on = None, ""
            if verify:
                verify_cfg = dataclasses.replace(  # the same data (source, column, split...), other windows
                    calibration, nsamples=4, seqlen=min(calibration.seqlen, 128),
                    seed=calibration.seed + 1, masking="random" if mask_id is not None else "none",
                    attention="full",  # the logits compared over whole windows, as before
                )
                from .fidelity import relative_output_error

                logger.info("Verifying: reloading the checkpoint and comparing its logits with the original's")
                tokens = calibration_tokens(tokenizer, verify_cfg, mask_id)
                error = relative_output_error(source, tmp, tokens, torch_device)
                verified_on = (f"{len(tokens)} noised canvases" if source.adapter.shared_stack is not None
                               else f"{len(tokens)} {'masked ' if mask_id is not None else ''}samples")

            checkpoint_bytes = sum(f.stat().st_size for f in shards)
            bpw = 8 * result.linear_bytes_quantized / max(result.linear_params, 1)
            report = build_report(
                source=public_name(source.model_id), linear_params=result.linear_params,
                linear_bytes_original=result.linear_bytes_original,
                linear_bytes_quantized=result.linear_bytes_quantized, checkpoint_bytes=checkpoint_bytes,
                source_checkpoint_bytes=source.source_bytes(), relative_output_error=error,
                calibration=(_calibration_record(calibration, source.adapter.block_length)
                             if method.needs_calibration else None),
                seconds_per_block=result.seconds_per_block, elapsed_s=time.perf_counter() - started,
                compat_repairs=compat.applied_repairs(), manifest=(writer or export).manifest(),
                calibration_fallbacks=method.calibration_fallbacks,
                display_names={k: v for k, v in {"method": type(method).display_name,
                                                "family": source.adapter.display_name}.items() if v},
            )
            write_report(tmp, report)
            if Path(source.model_id).expanduser().exists():  # found by `eval` from any directory; never pushed
                record_local_source(stage, source.path)
            if export is not None:  # config, model files, report (with its export record), card
                _write_card(tmp, repo_id=out.name)
                export.finish(tmp, qconfig, repo_id=out.name)
                shutil.rmtree(tmp)
            else:  # the loader as remote code, or (--no-self-contained) a guard asking for qdlm-export
                from ..loader.native_wrappers import finish_native

                finish_native(stage, self_contained=self_contained)
                _write_card(stage, repo_id=out.name)  # after: its load instructions depend on the loader copy
            if recipe is not None:
                _write_recipe(stage, recipe)
    finally:
        source.close()

    return QuantizeSummary(
        out=out, method=config.method, bits=config.bits, group_size=config.group_size,
        act_bits=getattr(config, "act_bits", None),
        quantized_modules=len(result.quantized_modules), bits_per_weight=bpw,
        linear_bytes_original=result.linear_bytes_original, linear_bytes_quantized=result.linear_bytes_quantized,
        checkpoint_bytes=checkpoint_bytes, source_checkpoint_bytes=report["source_checkpoint_bytes"],
        relative_output_error=error, elapsed_s=time.perf_counter() - started,
        compat_repairs=compat.applied_repairs(), verification_inputs=verified_on,
    )


def _check_argument_types(**args: Any) -> None:
    """The Python API's arguments, checked at entry: a wrong type fails here naming the argument and
    what it accepts, rather than deep inside (or, worse, working by accident: ``overwrite='no'`` is
    truthy)."""
    import os

    def fail(name: str, accepted: str) -> None:
        value = args[name]
        raise ArgumentTypeError(
            f"quantize() argument {name}={value!r} ({type(value).__name__}) is not {accepted}",
            hint=f"pass {name} as {accepted}",
        )

    for name in ("model", "out"):
        if not isinstance(args[name], (str, os.PathLike)) or (isinstance(args[name], str) and not args[name]):
            fail(name, "a non-empty str or os.PathLike (a folder path" + (" or Hub id)" if name == "model" else ")"))
    if not isinstance(args["config"], WeightOnlyConfig):
        fail("config", "a method config instance (e.g. make_config('rtn', bits=4) or RTNConfig(...))")
    if args["calibration"] is not None and not isinstance(args["calibration"], CalibrationConfig):
        fail("calibration", "a CalibrationConfig or None")
    for name in ("trust_remote_code", "overwrite", "verify", "self_contained", "allow_non_finite"):
        if not isinstance(args[name], bool):
            fail(name, "a bool (True or False)")
    for name in ("batch_size", "max_shard_bytes"):
        if isinstance(args[name], bool) or not isinstance(args[name], int):
            fail(name, "an int")
        if args[name] <= 0:
            raise ConfigError(f"quantize() argument {name}={args[name]} must be positive", hint=f"pass {name} >= 1")
    for name in ("device", "output_format"):
        if not isinstance(args[name], str):
            fail(name, "a str")
    for name in ("compute_dtype", "revision", "command"):
        if args[name] is not None and not isinstance(args[name], str):
            fail(name, "a str or None")
    if args["compute_dtype"] is not None and args["compute_dtype"] not in DTYPES:
        raise ConfigError(
            f"compute dtype {args['compute_dtype']!r} is not supported", hint=f"choose one of {', '.join(DTYPES)}"
        )
    if args["on_block"] is not None and not callable(args["on_block"]):
        fail("on_block", "a callable(done, total) or None")
    # a CalibrationConfig checks its own field types when it is built (configs.check_field_values)


def _router_quantized(source: SourceModel):
    """The family with its routers quantized (``--include-router``), where each router is a plain
    linear layer the loader can replace; refused, naming the module, where it is not."""
    import torch.nn as nn

    adapter = source.adapter
    name = adapter.display_name or adapter.name
    if adapter.router is None:
        raise ConfigError(f"--include-router: {name} models have no mixture-of-experts router",
                          hint="drop --include-router")
    for index, block in enumerate(adapter.block_list(source.skeleton())):
        try:
            router = block.get_submodule(adapter.router)
        except AttributeError:
            continue  # a dense layer
        if type(router) is not nn.Linear:
            raise ConfigError(
                f"--include-router: the router {adapter.block_prefix(index)}.{adapter.router} of {name} models is "
                f"a {type(router).__name__}, not a linear layer, so a quantized linear cannot replace it",
                hint="drop --include-router; the router stays in full precision",
            )
    return adapter.with_router_quantized()


def _check_layer_shapes(source: SourceModel, method) -> list:
    """Resolve every layer's scheme from the safetensors headers before any work, so a group size
    that does not fit a layer fails at once, naming the layer. Returns the layers to quantize
    (``exports.quantized_module.planned_module``), for the exports' shape refusals."""
    from ..exports.quantized_module import planned_module

    planned = []
    adapter = source.adapter
    layers = adapter.num_layers(source.config_dict)
    if adapter.has_experts:  # expert counts come from the stored tensors, not the dense list
        names = [n for i in range(layers) for n in adapter.stored_linears(i, source.keys())]
    else:
        names = adapter.quantizable_linears(layers)
    if method.config.include_lm_head:
        names.append(adapter.lm_head)
    for name in names:
        key = f"{name}.weight"
        if not source.has(key):
            if name == adapter.lm_head:
                continue  # tied head: refused later with its own message
            raise ModelNotFoundError(
                f"the checkpoint has no tensor {key}, which the {adapter.name} family expects",
                hint="the weights do not match the model family; check the model folder",
            )
        dtype, shape = source.tensor_meta(key)
        if len(shape) != 2 or dtype not in ST_FLOAT_DTYPES:
            raise InputDataError(
                f"source tensor {key} is {dtype} of shape {list(shape)}; a linear weight is a 2-D floating-point "
                f"matrix ({', '.join(ST_FLOAT_DTYPES)})",
                hint="the weights do not match the model family, or are already quantized; pass the original "
                "full-precision model",
            )
        scheme = method.layer_scheme(name, shape[1])
        planned.append(planned_module(name, shape[0], shape[1], scheme, method.scale_dtype))
    return planned


def _scale_dtype(config: WeightOnlyConfig, source: SourceModel) -> torch.dtype:
    if config.scale_dtype:
        return DTYPES[config.scale_dtype]
    first_linear = f"{source.adapter.block_prefix(0)}.{source.adapter.linear_names[0]}.weight"
    dtype = ST_FLOAT_DTYPES.get(source.tensor_meta(first_linear)[0]) if source.has(first_linear) else None
    return torch.float32 if dtype in (torch.float32, torch.float64) else torch.float16


def _tokenizer(source: SourceModel):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    except Exception as exc:
        raise ConfigError(
            f"could not load the tokenizer of {source.model_id} ({type(exc).__name__}: {exc})",
            hint="calibration and verification need the model's tokenizer files in its folder",
        ) from None


def _calibration_record(calibration: CalibrationConfig, block_length: int | None = None) -> dict[str, Any]:
    """How the calibration data was chosen; the dataset options only where they were set."""
    record = {
        "dataset": public_name(calibration.source), "nsamples": calibration.nsamples, "seqlen": calibration.seqlen,
        "seed": calibration.seed, "masking": calibration.masking, "attention": calibration.attention,
    }
    if calibration.attention == "block-causal":
        record["block_length"] = block_length
    options = {"text_field": calibration.text_field, "dataset_config": calibration.dataset_config,
               "split": calibration.split if calibration.split != "train" else None,
               "chat_template": calibration.chat_template or None}
    record.update({k: v for k, v in options.items() if v is not None})
    return record


def _quantization_config(config, source, result, calibration, method, command, fused=None) -> dict[str, Any]:
    adapter = source.adapter
    transforms = method.transform_metadata()
    return build_quantization_config(
        method=config.method,
        method_options=config.method_options(),
        weights={"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric,
                 "scale_dtype": dtype_name(method.scale_dtype)},
        activations=config.activations() if hasattr(config, "activations") else None,
        family=adapter.name,
        mask_token_id=adapter.mask_token_id(source.config_dict),
        logits_shift=adapter.logits_shift,
        quantized_modules=result.quantized_modules,
        module_overrides=result.module_overrides,
        modules_not_converted=result.modules_not_converted,
        transforms={"modules": result.module_transforms, **transforms} if (result.module_transforms or transforms) else {},
        calibration=(_calibration_record(calibration, source.adapter.block_length)
                     if method.needs_calibration else None),
        fused_experts=fused, shared_stack=shared_stack_section(adapter),
        provenance={
            "source": public_name(source.model_id),  # never an absolute path: config.json is published
            "source_kind": "local" if Path(source.model_id).expanduser().exists() else "hub",
            "tool": "qdlm-export",
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": public_command(command or " ".join(shlex.quote(a) for a in sys.argv)),
        },
    )


def _write_recipe(folder: Path, recipe: dict[str, Any]) -> None:
    import yaml

    header = ("# qdlm-export quantize --config qdlm_recipe.yaml --out OTHER reproduces this checkpoint.\n"
              "# model: a local path is written relative to where the run started, or as its folder name:\n"
              "# edit it to reproduce elsewhere. null means the embedded tiny LLaDA.\n")
    (folder / RECIPE_FILE).write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def _write_card(folder: Path, repo_id: str) -> None:
    from ..hub.card import write_model_card

    # The loading example names the final folder; `push` re-renders it with the Hub repo id.
    write_model_card(folder, repo_id)
