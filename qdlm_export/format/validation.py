"""``inspect``: what a qdlm checkpoint is, and whether every tensor its config promises is there
with the right dtype and shape. Reads safetensors headers only (plus the tiny ``weight_shape``
tensors), so it is instant on any size of model.

:func:`validate_checkpoint` is the one validation of a checkpoint folder: ``inspect``, ``push``,
``eval`` and ``convert`` call it, and its per-tensor check is the one ``from_pretrained`` runs
(``loader.check_module_tensors``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError, QdlmError
from .spec import DTYPES, FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, LinearSpec, module_spec, REPORT_FILE
from ..core.packing import SUPPORTED_BITS
from ..kernels import describe_backend
from ..loader.hf_quantizer import DAMAGED_HINT, TensorEntry, check_module_tensors, read_safetensors_headers, uses_integer_input
from .output import INCOMPLETE_MARKER, is_staging_folder
from ..quantize.pipeline import SAFETENSORS_DTYPES

ST_DTYPES = {**SAFETENSORS_DTYPES, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_KEY = "tensors"  # in REPORT_FILE: every tensor the writer wrote, name -> {"dtype", "shape"}
MAKE_HINT = "pass the folder written by `qdlm-export quantize` (make one with `qdlm-export quantize MODEL --out DIR`)"


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


@dataclass
class ValidCheckpoint:
    """What :func:`validate_checkpoint` established about a folder."""

    folder: Path
    config: dict[str, Any]
    qconfig: dict[str, Any] | None  # None: not a qdlm-native checkpoint (a converted format)
    weight_files: list[Path]  # the safetensors files the checkpoint loads (index shards, or model.safetensors)
    tensors: dict[str, TensorEntry]  # every tensor in those files, from their headers
    specs: dict[str, LinearSpec] = field(default_factory=dict)  # quantized module -> its tensors' spec
    manifest: dict[str, dict[str, Any]] | None = None  # qdlm_report.json's "tensors" (None: written before it existed)

    @property
    def checkpoint_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def is_qdlm(self) -> bool:
        return self.qconfig is not None


# ----------------------------------------------------------------------------------- validation
def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def link_roots(folder: Path) -> tuple[Path, ...]:
    """Where symlinks in ``folder`` may lead: the folder itself and, for a snapshot of the Hugging
    Face cache (``models--X/snapshots/REV``, whose files are links into ``models--X/blobs``), that
    repository's blobs."""
    root = folder.resolve()
    roots = [root]
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--") and blobs.is_dir():
        roots.append(blobs)
    return tuple(roots)


def stays_inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether ``path``, links resolved, lies in one of ``roots`` (:func:`link_roots`)."""
    target = path.resolve()
    return any(_inside(target, root) for root in roots)


def check_symlinks(folder: Path) -> None:
    """Refuse a symlink anywhere in ``folder`` whose target lies outside it (it would be read,
    loaded or uploaded as if it were part of the checkpoint)."""
    roots = link_roots(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for entry in (*dirnames, *filenames):
            path = Path(dirpath) / entry
            if not path.is_symlink():
                continue
            target = path.resolve()
            if not stays_inside(path, roots):
                raise CheckpointError(
                    f"{path.relative_to(folder).as_posix()} in {folder} is a symbolic link to {target}, outside the "
                    "checkpoint folder; it is refused so that nothing outside the folder is read or uploaded",
                    hint="replace the link by a copy of the file, or remove it",
                )


def _shard_path(folder: Path, shard: Any) -> Path:
    """The path of one index entry's shard; refuses entries that leave the folder."""
    where = f"{INDEX_FILE} in {folder}"
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{where} maps a tensor to {shard!r}, which is not a file name", hint=DAMAGED_HINT)
    pure = PurePosixPath(shard.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(shard) or ".." in pure.parts:
        raise CheckpointError(
            f"{where} lists the shard {shard!r}, a path outside the checkpoint folder; shards must be files inside it",
            hint="the index was edited or is hostile: re-create the checkpoint with `qdlm-export quantize`",
        )
    path = folder / pure
    if not stays_inside(path, link_roots(folder)):
        raise CheckpointError(
            f"{where} lists the shard {shard!r}, which resolves outside the checkpoint folder",
            hint="the index was edited or is hostile: re-create the checkpoint with `qdlm-export quantize`",
        )
    if not shard.endswith(".safetensors"):
        raise CheckpointError(f"{where} lists the shard {shard!r}, which is not a .safetensors file", hint=DAMAGED_HINT)
    return path


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a checkpoint loads: the shards of its index (each checked to stay inside
    the folder and to exist), or else ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map object)",
                                  hint=DAMAGED_HINT) from None
        shards = {value: _shard_path(folder, value) for value in dict.fromkeys(weight_map.values())}  # once per shard
        absent = sorted(name for name, path in shards.items() if not path.is_file())
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise CheckpointError(
                f"{folder} is missing {len(absent)} weight shard(s) listed in {INDEX_FILE}: {shown}",
                hint="the export was interrupted or files were moved. " + DAMAGED_HINT,
            )
        files = sorted(set(shards.values()))
    else:  # what from_pretrained loads without an index: model.safetensors, nothing else
        files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else []
    if not files:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        found = f" ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not loaded without an index)" if others else ""
        raise CheckpointError(
            f"{folder} has config.json but no weights ({SINGLE_FILE}, or shards with {INDEX_FILE}){found}",
            hint=MAKE_HINT,
        )
    return files


def _read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder} has no config.json, so it is not a complete checkpoint",
            hint="it may be an interrupted run; " + MAKE_HINT,
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not readable JSON ({exc})", hint=DAMAGED_HINT) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} should hold a JSON object, not a {type(config).__name__}",
                              hint=DAMAGED_HINT)
    return config


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist", hint=MAKE_HINT)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder", hint=MAKE_HINT)
    if is_staging_folder(folder):
        raise CheckpointError(
            f"{folder} is the staging folder of a qdlm-export run that is still running or was interrupted "
            f"(it holds {INCOMPLETE_MARKER} or is named like .NAME.partial-*): it is not a finished checkpoint",
            hint="use the --out folder once quantize has finished; a leftover of a killed run can be deleted "
            "(the next run into the same parent folder removes it)",
        )


def _quantization_config(config: dict[str, Any], config_file: Path) -> dict[str, Any]:
    qconfig = config.get("quantization_config")
    if not qconfig:
        raise CheckpointError(f"{config_file} has no quantization_config: this is not a quantized checkpoint",
                              hint=MAKE_HINT)
    if not isinstance(qconfig, dict):
        raise CheckpointError(f"quantization_config in {config_file} is not a JSON object", hint=DAMAGED_HINT)
    if qconfig.get("quant_method") != FORMAT_NAME:
        raise CheckpointError(
            f"quant_method is {qconfig.get('quant_method')!r}, not {FORMAT_NAME!r}",
            hint="inspect reads qdlm-native checkpoints; other formats load with their own toolkit",
        )
    if qconfig.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"qdlm format_version {qconfig.get('format_version')!r} is not supported (supports {SUPPORTED_FORMAT_VERSIONS})",
            hint="upgrade qdlm-export: pip install -U qdlm-export",
        )
    for key, kind in (("weights", dict), ("quantized_modules", list), ("method", str)):
        if key not in qconfig:
            raise CheckpointError(f"quantization_config in {config_file} has no {key!r} field; the checkpoint is incomplete",
                                  hint=DAMAGED_HINT)
        if not isinstance(qconfig[key], kind):
            raise CheckpointError(f"quantization_config[{key!r}] in {config_file} is not a {kind.__name__}",
                                  hint=DAMAGED_HINT)
    weights = qconfig["weights"]
    for key in ("bits", "group_size", "symmetric", "scale_dtype"):
        if key not in weights:
            raise CheckpointError(f"quantization_config.weights in {config_file} has no {key!r} field", hint=DAMAGED_HINT)
    # Types and ranges too: a string "4" or a bool where an int belongs must fail here, naming the
    # field, not later inside packing arithmetic.
    for key, ok, expected in (
        ("bits", lambda v: type(v) is int and v in SUPPORTED_BITS, f"one of {', '.join(map(str, SUPPORTED_BITS))} (an integer)"),
        ("group_size", lambda v: type(v) is int and (v == -1 or v > 0), "a positive integer or -1"),
        ("symmetric", lambda v: type(v) is bool, "true or false"),
    ):
        if not ok(weights[key]):
            raise CheckpointError(
                f"quantization_config.weights.{key} in {config_file} is {weights[key]!r}; expected {expected}",
                hint=DAMAGED_HINT,
            )
    if weights["scale_dtype"] not in DTYPES:
        raise CheckpointError(
            f"quantization_config.weights.scale_dtype in {config_file} is {weights['scale_dtype']!r}; "
            f"expected one of {', '.join(DTYPES)}", hint=DAMAGED_HINT,
        )
    if not all(isinstance(m, str) for m in qconfig["quantized_modules"]):
        raise CheckpointError(f"quantization_config.quantized_modules in {config_file} lists something that is not a "
                              "module name", hint=DAMAGED_HINT)
    return qconfig


def read_quantization_config(folder: Path) -> dict[str, Any]:
    """The ``quantization_config`` of a qdlm-native checkpoint folder (checked), or a CheckpointError."""
    folder = Path(folder)
    _check_folder(folder)
    return _quantization_config(_read_config(folder), folder / "config.json")


def _shape_of(name: str, tensors: dict[str, TensorEntry], where: str) -> tuple[int, int]:
    key = f"{name}.weight_shape"
    entry = tensors.get(key)
    if entry is None:
        raise CheckpointError(
            f"tensor {key} is missing from {where} (module {name} is listed as quantized in quantization_config)",
            hint=DAMAGED_HINT,
        )
    if entry.dtype != "I64" or tuple(entry.shape) != (2,):
        raise CheckpointError(
            f"tensor {key} in {entry.file} has dtype {entry.dtype} and shape {list(entry.shape)}, expected I64 (int64) [2]",
            hint=DAMAGED_HINT,
        )
    with safe_open(entry.path, "pt") as handle:
        out, inp = (int(v) for v in handle.get_tensor(key).tolist())
    if out <= 0 or inp <= 0:
        raise CheckpointError(f"tensor {key} in {entry.file} holds the shape [{out}, {inp}]", hint=DAMAGED_HINT)
    return out, inp


def validate_checkpoint(folder: str | Path, *, require_qdlm: bool = True) -> ValidCheckpoint:
    """The one validation of a checkpoint folder, used by ``inspect``, ``push``, ``eval`` and ``convert``.

    Refuses (:class:`CheckpointError` naming the file or tensor): a missing folder, a staging folder
    of an unfinished run, symlinks leading outside the folder, a missing or malformed config.json,
    index entries that are absolute, contain ``..`` or resolve outside the folder, missing shards,
    truncated or corrupted safetensors files; and for a qdlm-native checkpoint, any tensor the
    config promises that is missing or has the wrong dtype or shape (the same check
    ``from_pretrained`` runs, :func:`~qdlm_export.loader.hf_quantizer.check_module_tensors`). Headers only (plus
    the tiny ``weight_shape`` tensors): instant on any size of model.

    When ``qdlm_report.json`` holds the manifest of the tensors the checkpoint was written with
    (``"tensors"``, recorded by ``quantize`` and ``convert``), every tensor it lists must be in the
    weight files with that dtype and shape (the quantized modules' tensors are judged by the config
    instead): this catches a missing full-precision tensor (an embedding, a norm) that transformers
    would fill with random values. Folders written before the
    manifest existed have none and are checked as before.

    ``require_qdlm=False`` accepts checkpoints of other formats (converted exports), checking
    everything but the qdlm tensor layout (their manifest included).
    """
    folder = Path(folder)
    _check_folder(folder)
    check_symlinks(folder)
    config = _read_config(folder)
    qc = config.get("quantization_config")
    is_qdlm = isinstance(qc, dict) and qc.get("quant_method") == FORMAT_NAME
    qconfig = _quantization_config(config, folder / "config.json") if (require_qdlm or is_qdlm) else None
    files = weight_files(folder)
    tensors = read_safetensors_headers(files)
    names = [f.relative_to(folder).as_posix() for f in files]
    where = ", ".join(names) if len(names) <= 3 else f"the {len(names)} weight files"
    result = ValidCheckpoint(folder, config, qconfig, files, tensors, manifest=read_manifest(folder))
    if qconfig is not None:
        _check_quantized_modules(result, where)
    if result.manifest is not None:
        # quantization_config is the authority on its modules' tensors (checked above, as the loader
        # does; a deliberate re-encoding edits both consistently); the manifest covers all the others
        covered = {f"{name}.{suffix}" for name, spec in result.specs.items() for suffix in spec.tensors()}
        check_manifest(result.manifest, tensors, where, skip=covered)
    return result


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The tensor manifest in ``folder``'s ``qdlm_report.json`` (``"tensors"``), checked for form;
    None when the report or the entry is absent (a folder written before the manifest existed) or
    the report is not readable JSON (the report is otherwise informational)."""
    path = folder / REPORT_FILE
    report = _read_report(path)
    if report is None or MANIFEST_KEY not in report:
        return None
    manifest = report[MANIFEST_KEY]

    def well_formed(entry: Any) -> bool:
        return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"]))

    if not isinstance(manifest, dict):
        raise CheckpointError(f"the {MANIFEST_KEY!r} entry of {path} is not a JSON object of tensors",
                              hint=DAMAGED_HINT)
    for name, entry in manifest.items():
        if not well_formed(entry):
            raise CheckpointError(
                f"the {MANIFEST_KEY!r} entry of {path} describes tensor {name} as {entry!r}, not as "
                '{"dtype": "<safetensors dtype>", "shape": [<sizes>]}', hint=DAMAGED_HINT,
            )
    return manifest


def check_manifest(manifest: dict[str, dict[str, Any]], tensors: dict[str, TensorEntry], where: str,
                   skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Every tensor of the manifest is in ``tensors`` (the weight files' headers) with its dtype and
    shape; names in ``skip`` (a quantized module's tensors, already checked against the config) aside."""
    for name, entry in manifest.items():
        if name in skip:
            continue
        got = tensors.get(name)
        if got is None:
            raise CheckpointError(
                f"tensor {name} is missing from {where} ({REPORT_FILE} lists it among the tensors this checkpoint "
                "was written with; transformers would fill it with random values)",
                hint=DAMAGED_HINT,
            )
        if got.dtype != entry["dtype"]:
            raise CheckpointError(
                f"tensor {name} in {got.file} has dtype {got.dtype}, expected {entry['dtype']} (as written, "
                f"according to {REPORT_FILE})", hint=DAMAGED_HINT,
            )
        if list(got.shape) != list(entry["shape"]):
            raise CheckpointError(
                f"tensor {name} in {got.file} has shape {list(got.shape)}, expected {list(entry['shape'])} (as "
                f"written, according to {REPORT_FILE})", hint=DAMAGED_HINT,
            )


def _check_quantized_modules(result: ValidCheckpoint, where: str) -> None:
    """Every module ``quantization_config`` lists has its tensors (``loader.check_module_tensors``)."""
    qconfig, tensors = result.qconfig, result.tensors
    for name in qconfig["quantized_modules"]:
        out, inp = _shape_of(name, tensors, where)
        has_bias = f"{name}.bias" in tensors
        bias_dtype = ST_DTYPES.get(tensors[f"{name}.bias"].dtype, torch.float32) if has_bias else torch.float32
        try:
            spec = module_spec(qconfig, name, inp, out, has_bias, bias_dtype)
        except QdlmError:
            raise
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise CheckpointError(
                f"module {name}: quantization_config does not describe a valid scheme for it ({type(exc).__name__}: {exc})",
                hint=DAMAGED_HINT,
            ) from None
        check_module_tensors(name, spec, tensors, where)
        if f"{name}.weight" in tensors:
            raise CheckpointError(
                f"tensor {name}.weight is present although {name} is listed as quantized",
                hint="the checkpoint mixes a full-precision and a quantized copy of the layer; " + DAMAGED_HINT,
            )
        result.specs[name] = spec


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


def inspect_checkpoint(folder: str | Path, *, device: str | None = None, tokens: int = 256) -> CheckpointInfo:
    """Describe and validate a checkpoint; raises :class:`CheckpointError` naming the first bad tensor.

    ``kernels`` says, per quantized linear, which backend the loader would pick on ``device``
    (default: cuda when available) for ``tokens`` rows (batch x sequence) in the model's dtype."""
    from ..core.arguments import check_device, check_int, check_path

    check_path("inspect_checkpoint", "folder", folder)
    check_int("inspect_checkpoint", "tokens", tokens, low=1, option="--tokens")
    if device is not None:
        device = check_device(device, allow_auto=False)
    folder = Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checked = validate_checkpoint(folder)
    qconfig = checked.qconfig
    compute_dtype = _model_dtype(checked.config)
    kernels: dict[str, str] = {}
    linear_params = linear_bytes = 0
    for name, spec in checked.specs.items():
        kernels[name] = describe_kernels(spec, device, tokens, compute_dtype)
        linear_params += spec.out_features * spec.in_features
        bias_bytes = spec.out_features * torch.empty((), dtype=spec.bias_dtype).element_size() if spec.has_bias else 0
        linear_bytes += spec.stored_bytes() - bias_bytes

    weights = qconfig["weights"]
    report = _read_report(folder / REPORT_FILE)
    if report is not None:  # the manifest was checked above; printed, it would be one line per tensor
        report.pop(MANIFEST_KEY, None)
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
        checkpoint_bytes=checked.checkpoint_bytes,
        linear_params=linear_params,
        linear_bytes_quantized=linear_bytes,
        bits_per_weight=8 * linear_bytes / max(linear_params, 1),
        provenance=dict(qconfig.get("provenance", {})),
        report=report,
        kernels=kernels,
        kernel_device=device,
        kernel_tokens=tokens,
    )


def _read_report(path: Path) -> dict[str, Any] | None:
    """The report written beside the checkpoint; an unreadable one is left out, not an error."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def _model_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint loads in by default (config ``dtype``/``torch_dtype``; float32 if absent)."""
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
