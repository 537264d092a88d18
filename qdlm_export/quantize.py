"""``quantize()``: source model + method config + calibration -> a complete, verified checkpoint folder.

The order is the contract: validate everything that can be validated before any heavy work, write
into a staged temporary folder, verify the written result by reloading it, then move it into place.
"""

from __future__ import annotations

import dataclasses
import json
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

from . import __version__
from .calibration import calibration_tokens
from .configs import CalibrationConfig, WeightOnlyConfig
from .errors import ConfigError, ModelNotFoundError
from .formats.native import DTYPES, FORMAT_NAME, FORMAT_VERSION, dtype_name
from .formats.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from .methods import method_class
from .output import check_output, staged_output
from .pipeline import SAFETENSORS_DTYPES, default_compute_dtype, resolve_device, run_pipeline
from .source import SourceModel

REPORT_FILE = "qdlm_report.json"


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

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out"] = str(self.out)
        return d


def make_config(method: str, **options: Any) -> WeightOnlyConfig:
    cls = method_class(method).config_class
    return cls.from_options(**options)


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
) -> QuantizeSummary:
    """Quantize ``model`` into ``out``.

    ``output_format`` other than native: the native checkpoint is written and verified in a scratch
    folder, then converted (formats/); what the format cannot express is refused before any work
    where it can be known from the options. ``self_contained``: native checkpoints of remote-code
    families carry the loader as remote code, so they load with transformers alone.
    """
    from .convert import FORMATS, check_convertible

    started = time.perf_counter()
    out = Path(out).expanduser().resolve()
    check_output(out, overwrite)
    if output_format not in FORMATS:
        raise ConfigError(f"--format {output_format!r} is unknown", hint=f"choose one of {', '.join(FORMATS)}")
    if output_format in ("gptq", "awq") and config.scale_dtype is None:
        config = dataclasses.replace(config, scale_dtype="float16")  # what their loaders expect
    if output_format != "native":
        check_convertible(
            {"weights": {"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric,
                         **({"scale_dtype": config.scale_dtype} if config.scale_dtype else {})},
             "activations": config.activations() if hasattr(config, "activations") else None},
            output_format,
        )
    calibration = calibration or CalibrationConfig()
    torch_device = resolve_device(device)
    dtype = DTYPES[compute_dtype] if compute_dtype else default_compute_dtype(torch_device)

    source = SourceModel.open(model, trust_remote_code=trust_remote_code, revision=revision)
    try:
        method = method_class(config.method)(config, source.adapter, source.config_dict)
        method.scale_dtype = _scale_dtype(config, source)
        _check_layer_shapes(source, method)
        tokenizer = _tokenizer(source) if (method.needs_calibration or verify) else None
        mask_id = source.adapter.mask_token_id(source.config_dict)
        calibration = dataclasses.replace(calibration, masking=calibration.resolved_masking(mask_id))
        calib_tokens = calibration_tokens(tokenizer, calibration, mask_id) if method.needs_calibration else None

        with staged_output(out, overwrite) as stage:
            # Non-native formats: write (and verify) native in a scratch folder, convert at the end.
            tmp = stage if output_format == "native" else Path(tempfile.mkdtemp(prefix=".native-", dir=stage))
            writer = ShardedWriter(tmp, max_shard_bytes)
            result = run_pipeline(
                source, method, writer, calib_tokens=calib_tokens, device=torch_device,
                compute_dtype=dtype, batch_size=batch_size, on_block=on_block,
            )
            shards = writer.close()
            for f in source.copyable_files():
                shutil.copy2(f, tmp / f.name)
            qconfig = _quantization_config(config, source, result, calibration, method, command)
            config_dict = dict(source.config_dict)
            config_dict["quantization_config"] = qconfig
            (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")

            error = None
            if verify:
                verify_cfg = CalibrationConfig(
                    source=calibration.source, nsamples=4, seqlen=min(calibration.seqlen, 128),
                    seed=calibration.seed + 1, masking="random" if mask_id is not None else "none",
                    text_field=calibration.text_field,
                )
                from .verify import relative_output_error

                tokens = calibration_tokens(tokenizer, verify_cfg, mask_id)
                error = relative_output_error(source, tmp, tokens, torch_device)

            checkpoint_bytes = sum(f.stat().st_size for f in shards)
            bpw = 8 * result.linear_bytes_quantized / max(result.linear_params, 1)
            report = {
                "source": source.model_id,
                "linear_params": result.linear_params,
                "linear_bytes_original": result.linear_bytes_original,
                "linear_bytes_quantized": result.linear_bytes_quantized,
                "checkpoint_bytes": checkpoint_bytes,
                "source_checkpoint_bytes": source.source_bytes(),
                "bits_per_weight": round(bpw, 4),
                "relative_output_error": error,
                "calibration": _calibration_record(calibration) if method.needs_calibration else None,
                "seconds_per_block": [round(s, 3) for s in result.seconds_per_block],
                "elapsed_s": round(time.perf_counter() - started, 2),
                "eval": None,
            }
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            _write_card(tmp, repo_id=out.name)
            if output_format != "native":
                from .convert import write_converted

                write_converted(tmp, stage, output_format, max_shard_bytes=max_shard_bytes, repo_id=out.name)
                shutil.rmtree(tmp)
                checkpoint_bytes = sum(f.stat().st_size for f in stage.glob("*.safetensors"))
            elif self_contained and source.config_dict.get("auto_map"):
                from .formats.selfcontained import make_self_contained

                make_self_contained(stage)
    finally:
        source.close()

    return QuantizeSummary(
        out=out, method=config.method, bits=config.bits, group_size=config.group_size,
        act_bits=getattr(config, "act_bits", None),
        quantized_modules=len(result.quantized_modules), bits_per_weight=bpw,
        linear_bytes_original=result.linear_bytes_original, linear_bytes_quantized=result.linear_bytes_quantized,
        checkpoint_bytes=checkpoint_bytes, source_checkpoint_bytes=report["source_checkpoint_bytes"],
        relative_output_error=error, elapsed_s=time.perf_counter() - started,
    )


def _check_layer_shapes(source: SourceModel, method) -> None:
    """Resolve every layer's scheme from the safetensors headers before any work, so a group size
    that does not fit a layer fails at once, naming the layer."""
    adapter = source.adapter
    names = adapter.quantizable_linears(adapter.num_layers(source.config_dict))
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
        _, shape = source.tensor_meta(key)
        method.layer_scheme(name, shape[1])


def _scale_dtype(config: WeightOnlyConfig, source: SourceModel) -> torch.dtype:
    if config.scale_dtype:
        return DTYPES[config.scale_dtype]
    first_linear = f"{source.adapter.block_prefix(0)}.{source.adapter.linear_names[0]}.weight"
    dtype = SAFETENSORS_DTYPES.get(source.tensor_meta(first_linear)[0]) if source.has(first_linear) else None
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


def _calibration_record(calibration: CalibrationConfig) -> dict[str, Any]:
    return {
        "dataset": calibration.source, "nsamples": calibration.nsamples, "seqlen": calibration.seqlen,
        "seed": calibration.seed, "masking": calibration.masking,
    }


def _quantization_config(config, source, result, calibration, method, command) -> dict[str, Any]:
    adapter = source.adapter
    return {
        "quant_method": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "method_options": config.method_options(),
        "weights": {
            "bits": config.bits,
            "group_size": config.group_size,
            "symmetric": config.symmetric,
            "scale_dtype": dtype_name(method.scale_dtype),
        },
        "activations": config.activations() if hasattr(config, "activations") else None,
        "family": adapter.name,
        "dllm": {
            "mask_token_id": adapter.mask_token_id(source.config_dict),
            "logits_shift": adapter.logits_shift,
        },
        "quantized_modules": result.quantized_modules,
        "module_overrides": result.module_overrides,
        "modules_not_converted": result.modules_not_converted,
        "transforms": {"modules": result.module_transforms, **method.transform_metadata()}
        if (result.module_transforms or method.transform_metadata())
        else {},
        "calibration": _calibration_record(calibration) if method.needs_calibration else None,
        "provenance": {
            "source": source.model_id,
            "tool": "qdlm-export",
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        },
    }


def _write_card(folder: Path, repo_id: str) -> None:
    from .model_card import write_model_card

    # The loading example names the final folder; `push` re-renders it with the Hub repo id.
    write_model_card(folder, repo_id)
