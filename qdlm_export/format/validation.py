"""``inspect``: what a qdlm checkpoint is, and whether every tensor its config promises is there
with the right dtype and shape. Reads safetensors headers only (plus the tiny ``weight_shape``
tensors), so it is instant on any size of model.

:func:`validate_checkpoint` is the one validation of a checkpoint folder: ``inspect``, ``push``,
``eval`` and ``convert`` call it, and its per-tensor check is the one ``from_pretrained`` runs
(``format.tensor_headers.check_module_tensors``). Folders are read through :mod:`.reader`; the
config through :mod:`.config_schema`; the report and its manifest through :mod:`.report`. Which
kernels the loader would run is the loader's to say (``loader/kernel_choice.py``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, QdlmError
from .config_schema import parse_quantization_config
from .reader import CheckpointReader, check_folder, check_symlinks, read_config
from .report import MANIFEST_KEY, check_manifest, read_manifest, read_report
from .spec import (
    FORMAT_NAME,
    FUSED_EXPERTS_KEY,
    ST_DTYPES,
    STACKED_KEY,
    LinearSpec,
    fused_projections,
    module_spec,
    shared_stack_prefixes,
    unstacked_projections,
)
from .tensor_headers import DAMAGED_HINT, TensorEntry, check_module_tensors


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
    # fused experts module -> its quantization_config.fused_experts entry (expert count, row split)
    fused_experts: dict[str, Any] = field(default_factory=dict)
    # a second layer stack computing with the stored modules: {"alias", "stored", "modules": how many}
    shared_stack: dict[str, Any] | None = None
    kernel_device: str = "cpu"
    kernel_tokens: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def layout_rows(self) -> list[tuple[str, str]]:
        """``(label, text)`` rows describing fused experts (per module: its expert count and row split)
        and the shared stack, for ``inspect``'s table; none for other checkpoints."""
        rows = []
        for i, (name, entry) in enumerate(self.fused_experts.items()):
            gate_up, down = entry["gate_up"], entry["down"]
            if entry.get(STACKED_KEY, True):
                text = (f"{name}: {entry['num_experts']} experts stacked, {gate_up['module']} "
                        f"{'+'.join(map(str, gate_up['rows']))} rows ({'/'.join(gate_up['parts'])}), "
                        f"{down['module']} {'+'.join(map(str, down['rows']))} rows")
            else:
                text = (f"{name}: {entry['num_experts']} experts unstacked (weight-activation), one quantized "
                        f"linear per expert: {', '.join(gate_up['parts'] + down['parts'])}")
            rows.append(("fused experts" if i == 0 else "", text))
        if self.shared_stack:
            s = self.shared_stack
            text = (f"{s['alias']}* computes with the {s['modules']} quantized modules stored once under "
                    f"{s['stored']}* (both stacks use them)")
            rows.append(("shared stack", text))
        return rows


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


def read_quantization_config(folder: Path) -> dict[str, Any]:
    """The ``quantization_config`` of a qdlm-native checkpoint folder (checked), or a CheckpointError."""
    folder = Path(folder)
    check_folder(folder)
    return parse_quantization_config(read_config(folder), folder / "config.json")


def _shape_of(name: str, reader: CheckpointReader, where: str, experts: int = 0) -> tuple[int, int]:
    """``(out, in)`` from ``NAME.weight_shape``; a stacked projection's ``[experts, 2]`` rows must agree."""
    key = f"{name}.weight_shape"
    entry = reader.entries.get(key)
    if entry is None:
        raise CheckpointError(
            f"tensor {key} is missing from {where} (module {name} is listed as quantized in quantization_config)",
            hint=DAMAGED_HINT,
        )
    want = (experts, 2) if experts else (2,)
    if entry.dtype != "I64" or tuple(entry.shape) != want:
        raise CheckpointError(
            f"tensor {key} in {entry.file} has dtype {entry.dtype} and shape {list(entry.shape)}, expected I64 (int64) "
            f"{list(want)}" + (f" ({experts} experts, quantization_config.{FUSED_EXPERTS_KEY})" if experts else ""),
            hint=DAMAGED_HINT,
        )
    shapes = reader.get(key).reshape(-1, 2).tolist()
    if any(row != shapes[0] for row in shapes):
        raise CheckpointError(f"tensor {key} in {entry.file} gives the experts different shapes", hint=DAMAGED_HINT)
    out, inp = (int(v) for v in shapes[0])
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
    ``from_pretrained`` runs, :func:`~qdlm_export.format.tensor_headers.check_module_tensors`). Headers only (plus
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
    check_folder(folder)
    check_symlinks(folder)
    config = read_config(folder)
    qc = config.get("quantization_config")
    is_qdlm = isinstance(qc, dict) and qc.get("quant_method") == FORMAT_NAME
    qconfig = parse_quantization_config(config, folder / "config.json") if (require_qdlm or is_qdlm) else None
    reader = CheckpointReader.open(folder)
    files, tensors = reader.files, reader.entries
    names = [f.relative_to(folder).as_posix() for f in files]
    where = ", ".join(names) if len(names) <= 3 else f"the {len(names)} weight files"
    result = ValidCheckpoint(folder, config, qconfig, files, tensors, manifest=read_manifest(folder))
    try:
        if qconfig is not None:
            _check_quantized_modules(result, reader, where)
    finally:
        reader.close()
    if result.manifest is not None:
        # quantization_config is the authority on its modules' tensors (checked above, as the loader
        # does; a deliberate re-encoding edits both consistently); the manifest covers all the others
        covered = {f"{name}.{suffix}" for name, spec in result.specs.items() for suffix in spec.tensors()}
        check_manifest(result.manifest, tensors, where, skip=covered)
    return result


def _check_quantized_modules(result: ValidCheckpoint, reader: CheckpointReader, where: str) -> None:
    """Every module ``quantization_config`` lists has its tensors (``tensor_headers.check_module_tensors``)."""
    qconfig, tensors = result.qconfig, result.tensors
    fused = fused_projections(qconfig)
    for name in qconfig["quantized_modules"]:
        stacked = fused.get(name)
        experts = stacked.experts if stacked else 0
        out, inp = _shape_of(name, reader, where, experts)
        if stacked and out != stacked.out_features:
            raise CheckpointError(
                f"tensor {name}.weight_shape gives {out} rows per expert; quantization_config.{FUSED_EXPERTS_KEY} gives "
                f"{list(stacked.rows)} ({stacked.out_features})", hint=DAMAGED_HINT)
        has_bias = f"{name}.bias" in tensors
        bias_dtype = ST_DTYPES.get(tensors[f"{name}.bias"].dtype, torch.float32) if has_bias else torch.float32
        try:
            spec = module_spec(qconfig, name, inp, out, has_bias, bias_dtype, experts=experts)
        except QdlmError:
            raise
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise CheckpointError(
                f"module {name}: quantization_config does not describe a valid scheme for it ({type(exc).__name__}: {exc})",
                hint=DAMAGED_HINT,
            ) from None
        check_module_tensors(name, spec, tensors, where)
        dense = name if stacked else f"{name}.weight"  # a stacked projection's float tensor is the module's name
        if dense in tensors:
            raise CheckpointError(
                f"tensor {dense} is present although {name} is listed as quantized",
                hint="the checkpoint mixes a full-precision and a quantized copy of the layer; " + DAMAGED_HINT,
            )
        result.specs[name] = spec


def inspect_checkpoint(folder: str | Path, *, device: str | None = None, tokens: int = 256) -> CheckpointInfo:
    """Describe and validate a checkpoint; raises :class:`CheckpointError` naming the first bad tensor.

    ``kernel_device`` (default: cuda when available) and ``kernel_tokens`` record where the caller
    asks ``loader.kernel_choice.kernel_plans`` to describe the kernels (``kernels``: filled by it)."""
    from ..core.arguments import check_device, check_int, check_path

    check_path("inspect_checkpoint", "folder", folder)
    check_int("inspect_checkpoint", "tokens", tokens, low=1, option="--tokens")
    if device is not None:
        device = check_device(device, allow_auto=False)
    folder = Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checked = validate_checkpoint(folder)
    qconfig = checked.qconfig
    linear_params = linear_bytes = 0
    for spec in checked.specs.values():
        linear_params += spec.weight_count
        bias_bytes = spec.out_features * torch.empty((), dtype=spec.bias_dtype).element_size() if spec.has_bias else 0
        linear_bytes += spec.stored_bytes() - bias_bytes

    weights = qconfig["weights"]
    report = read_report(folder)
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
        kernel_device=device,
        kernel_tokens=tokens,
        fused_experts=dict(qconfig.get(FUSED_EXPERTS_KEY) or {}),
        shared_stack=_shared_stack_info(qconfig),
    )


def _shared_stack_info(qconfig: dict[str, Any]) -> dict[str, Any] | None:
    """The shared stack (``quantization_config.shared_stack``) and how many of the stored quantized
    modules (linears and fused experts, each listed once; an unstacked experts module once, not per
    expert linear) the second stack computes with."""
    prefixes = shared_stack_prefixes(qconfig)
    if prefixes is None:
        return None
    alias, stored = prefixes
    owner = {name: fp.module for name, fp in fused_projections(qconfig).items()}
    owner.update({name: fp.module for fp in unstacked_projections(qconfig).values() for name in fp.expert_linears()})
    modules = {owner.get(n, n) for n in qconfig["quantized_modules"] if n.startswith(stored)}
    return {"alias": alias, "stored": stored, "modules": len(modules)}
