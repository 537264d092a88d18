"""``inspect``: what a qdlm checkpoint is, and whether every tensor its config promises is there
with the right dtype and shape. Reads safetensors headers only (plus the tiny ``weight_shape``
tensors), so it is instant on any size of model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .formats.native import DTYPES, FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, LinearSpec, dtype_name, module_spec
from .kernels import describe_backend
from .loader import uses_integer_input
from .pipeline import SAFETENSORS_DTYPES

ST_DTYPES = {**SAFETENSORS_DTYPES, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8}


@dataclass
class CheckpointInfo:
    path: str
    method: str
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: str
    activations: Any
    family: str | None
    quantized_modules: list[str]
    modules_not_converted: list[str]
    module_overrides: dict[str, Any]
    transforms: dict[str, Any]
    checkpoint_bytes: int
    linear_params: int
    linear_bytes_quantized: int
    bits_per_weight: float
    provenance: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    kernels: dict[str, str] = field(default_factory=dict)  # module -> the backends the loader would use
    kernel_device: str = "cpu"
    kernel_tokens: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Tensors:
    """Header-level view of every tensor in a folder's safetensors files."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (folder / f).is_file():
                    raise CheckpointError(f"shard {f} listed in model.safetensors.index.json is missing")
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder} has no .safetensors weights")
        self.meta: dict[str, tuple[torch.dtype | str, tuple[int, ...], Path]] = {}
        self.bytes = 0
        for f in files:
            path = folder / f
            self.bytes += path.stat().st_size
            try:
                with safe_open(path, "pt") as handle:
                    for key in handle.keys():
                        sl = handle.get_slice(key)
                        self.meta[key] = (ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()), path)
            except Exception as exc:
                raise CheckpointError(f"weight file {f} cannot be read ({exc})", hint="the file is truncated or corrupt") from None

    def value(self, key: str) -> torch.Tensor:
        with safe_open(self.meta[key][2], "pt") as handle:
            return handle.get_tensor(key)


def describe_kernels(spec: LinearSpec, device: torch.device | str, tokens: int, dtype: torch.dtype) -> str:
    """Which kernel backends the loader would run this linear on (``inspect``), for ``tokens`` rows."""
    shapes = dict(M=tokens, in_features=spec.in_features, out_features=spec.out_features, bits=spec.bits,
                  group_size=spec.group_size, symmetric=spec.symmetric, dtype=dtype)
    parts = [f"hadamard({op['size']}): {describe_backend('hadamard', device, n=op['size'], dtype=torch.float32)}"
             for op in spec.input_transforms if op.get("op") == "hadamard"]
    if uses_integer_input(spec):
        parts.append(describe_backend("w4a4_linear", device, act_bits=spec.input_activation.bits, **shapes))
    else:
        parts.append(describe_backend("weight_only_linear", device, **shapes))
    return "; ".join(parts)


def read_quantization_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder", hint="pass the folder written by `qdlm-export quantize`")
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder} has no config.json, so it is not a complete checkpoint",
            hint="it may be an interrupted run; quantize again with `qdlm-export quantize ... --out DIR`",
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from None
    qconfig = config.get("quantization_config")
    if not qconfig:
        raise CheckpointError(f"{config_file} has no quantization_config: this is not a quantized checkpoint")
    if qconfig.get("quant_method") != FORMAT_NAME:
        raise CheckpointError(
            f"quant_method is {qconfig.get('quant_method')!r}, not {FORMAT_NAME!r}",
            hint="inspect reads qdlm-native checkpoints",
        )
    if qconfig.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"qdlm format_version {qconfig.get('format_version')!r} is not supported (supports {SUPPORTED_FORMAT_VERSIONS})",
            hint="upgrade qdlm-export: pip install -U qdlm-export",
        )
    for key in ("weights", "quantized_modules", "method"):
        if key not in qconfig:
            raise CheckpointError(f"quantization_config has no {key!r} field")
    return qconfig


def inspect_checkpoint(folder: str | Path, *, device: str | None = None, tokens: int = 256) -> CheckpointInfo:
    """Describe and validate a checkpoint; raises :class:`CheckpointError` naming the first bad tensor.

    ``kernels`` says, per quantized linear, which backend the loader would pick on ``device``
    (default: cuda when available) for ``tokens`` rows (batch x sequence) in the model's dtype."""
    folder = Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = _model_dtype(folder)
    kernels: dict[str, str] = {}
    qconfig = read_quantization_config(folder)
    tensors = _Tensors(folder)
    linear_params = linear_bytes = 0
    for name in qconfig["quantized_modules"]:
        shape_key = f"{name}.weight_shape"
        if shape_key not in tensors.meta:
            raise CheckpointError(f"tensor {shape_key} is missing", hint=f"module {name} is listed as quantized")
        out, inp = (int(v) for v in tensors.value(shape_key).tolist())
        has_bias = f"{name}.bias" in tensors.meta
        bias_dtype = tensors.meta[f"{name}.bias"][0] if has_bias else torch.float32
        spec = module_spec(qconfig, name, inp, out, has_bias, bias_dtype)
        for suffix, (dtype, shape) in spec.tensors().items():
            key = f"{name}.{suffix}"
            if key not in tensors.meta:
                raise CheckpointError(f"tensor {key} is missing", hint=f"module {name} is listed as quantized")
            got_dtype, got_shape, _ = tensors.meta[key]
            if got_dtype != dtype:
                raise CheckpointError(
                    f"tensor {key} has dtype {dtype_name(got_dtype) if isinstance(got_dtype, torch.dtype) else got_dtype}, "
                    f"expected {dtype_name(dtype)}"
                )
            if tuple(got_shape) != tuple(shape):
                raise CheckpointError(f"tensor {key} has shape {list(got_shape)}, expected {list(shape)}")
        if f"{name}.weight" in tensors.meta:
            raise CheckpointError(f"tensor {name}.weight is present although {name} is listed as quantized")
        kernels[name] = describe_kernels(spec, device, tokens, compute_dtype)
        linear_params += out * inp
        linear_bytes += spec.stored_bytes() - (out * torch.empty((), dtype=bias_dtype).element_size() if has_bias else 0)

    weights = qconfig["weights"]
    report_file = folder / "qdlm_report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    return CheckpointInfo(
        path=str(folder),
        method=qconfig["method"],
        bits=weights["bits"],
        group_size=weights["group_size"],
        symmetric=weights["symmetric"],
        scale_dtype=weights.get("scale_dtype", "?"),
        activations=qconfig.get("activations"),
        family=qconfig.get("family"),
        quantized_modules=list(qconfig["quantized_modules"]),
        modules_not_converted=list(qconfig.get("modules_not_converted", [])),
        module_overrides=dict(qconfig.get("module_overrides", {})),
        transforms=dict(qconfig.get("transforms") or {}),
        checkpoint_bytes=tensors.bytes,
        linear_params=linear_params,
        linear_bytes_quantized=linear_bytes,
        bits_per_weight=8 * linear_bytes / max(linear_params, 1),
        provenance=dict(qconfig.get("provenance", {})),
        report=report,
        kernels=kernels,
        kernel_device=device,
        kernel_tokens=tokens,
    )


def _model_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint loads in by default (config ``dtype``/``torch_dtype``; float32 if absent)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
