"""``convert``: rewrite a native qdlm checkpoint into another quantized format (GPTQ, AWQ, compressed-tensors).

A conversion never re-quantizes: it re-encodes the very codes, scales and zero points of the native
checkpoint in the target's layout, so the target's dequantized weights equal the native ones. What
a target cannot express (online transforms, a bit width, a shape, a scale it cannot store exactly)
is refused up front with a message saying what and why; docs/EXPORTS.md lists the rules.

The machinery shared by every target lives here: :class:`ExportFormat` is what a target implements
(``exports/gptq.py``, ``exports/awq.py``, ``exports/compressed_tensors.py``). It encodes one linear at a
time (:class:`~.quantized_module.QuantizedModule` and its
:class:`~.quantized_module.LinearTensors`), whether they come from a native folder read lazily through
the one reader (:func:`write_converted`, ``convert DIR``) or from the quantizer's in-memory result
(``streaming.ConvertingSink``, ``quantize --format``); both stream the tensors through
:class:`~qdlm_export.format.writer.ShardedWriter`, so memory stays at one module's tensors.

Entry points::

    convert(src_dir, out_dir, "gptq", overwrite=False)        # atomic: staged, then moved into place
    write_converted(src_dir, empty_dir, "awq")                 # into a folder the caller stages
    check_convertible(qconfig, "compressed-tensors")           # early refusal from a (partial) config
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentTypeError, CheckpointError, ConfigError
from ..format.staging import staged_output
from ..format.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from .export_folder import write_export_files
from .native_source import NativeCheckpoint
from .quantized_module import LinearTensors, QuantizedModule

NATIVE = "native"
# Target name -> module defining ``FORMAT`` (an ExportFormat instance). Imported on first use.
_TARGET_MODULES = {
    "gptq": "qdlm_export.exports.gptq",
    "awq": "qdlm_export.exports.awq",
    "compressed-tensors": "qdlm_export.exports.compressed_tensors",
}
TARGETS = tuple(_TARGET_MODULES)
FORMATS = (NATIVE, *TARGETS)  # what `--format` accepts

_MAX_LISTED = 8  # modules named in one refusal message


# ---------------------------------------------------------------------------------------------
# What a target implements
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInventory:
    """What a target's ``quantization_config`` is built from, once every tensor is written."""

    qconfig: dict[str, Any]  # the native quantization_config
    modules: list[QuantizedModule]  # in qconfig["quantized_modules"] order
    passthrough: list[tuple[str, tuple[int, ...]]]  # (key, shape) of every tensor of no quantized module


class ExportFormat:
    """A target format. Subclasses fill in the hooks; refusals are returned as reasons (strings)."""

    name: str = ""
    title: str = ""  # for messages and the model card ("GPTQ (v1)")

    def config_problems(self, qconfig: dict[str, Any]) -> list[str]:
        """Scheme-level reasons this target cannot express the checkpoint (config only, no tensors).
        Must cope with partial configs (``check_convertible`` before quantizing)."""
        return []

    def module_problems(self, m: QuantizedModule, qconfig: dict[str, Any]) -> list[str]:
        """Shape/scheme reasons this target cannot hold one module (no tensor values read)."""
        return []

    def module_tensors(self, m: QuantizedModule, data: LinearTensors, qconfig: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The target's tensors of one module, by suffix (exact re-encoding; may raise on values).
        ``qconfig``: at least the native ``weights`` section."""
        raise NotImplementedError

    def passthrough(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor that belongs to no quantized module, as the target stores it (default: unchanged)."""
        return tensor

    def quantization_config(self, inventory: ExportInventory) -> dict[str, Any]:
        raise NotImplementedError

    def how_to_load(self, folder_name: str, config: dict[str, Any]) -> str:
        """Markdown for the model card's "How to load" section."""
        return ""

    def format_note(self) -> str:
        """Markdown for the model card's "Format" section."""
        return ""


def get_format(to: str) -> ExportFormat:
    key = str(to).strip().lower()
    if key == NATIVE:
        raise ConfigError("the checkpoint is already in the native qdlm format", hint="choose --to gptq, awq or compressed-tensors")
    if key not in _TARGET_MODULES:
        raise ConfigError(f"unknown export format {to!r}", hint=f"choose one of {', '.join(TARGETS)}")
    return importlib.import_module(_TARGET_MODULES[key]).FORMAT


# ---------------------------------------------------------------------------------------------
# Refusals shared by several targets (each target decides which apply)
# ---------------------------------------------------------------------------------------------


def online_transform_problem(qconfig: dict[str, Any], target: str) -> str | None:
    """Non-empty per-module online transforms (rotations, smoothing applied at run time)."""
    modules = (qconfig.get("transforms") or {}).get("modules") or {}
    kinds: dict[str, int] = {}
    for ops in modules.values():
        for op in ops:
            kind = op.get("op")
            if kind not in ("quantize_input", "quantize_output"):
                kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        return None
    listed = ", ".join(f"{k} ({n} module{'s' if n > 1 else ''})" for k, n in sorted(kinds.items()))
    return (
        f"the checkpoint applies online input transforms at run time ({listed}); {target} has no way to "
        "express transforms that the loader must apply to activations, so the converted model would compute "
        "a different function. Offline (fused) rotations are fine: quantize with a method or options that "
        "fold every transform into the weights, or keep the native format"
    )


def output_quant_problem(qconfig: dict[str, Any], target: str) -> str | None:
    modules = (qconfig.get("transforms") or {}).get("modules") or {}
    n = sum(1 for ops in modules.values() if any(op.get("op") == "quantize_output" for op in ops))
    if not n:
        return None
    return (
        f"{n} module(s) quantize their outputs (activations.qkv_bits, the q/k/v cache quantization); "
        f"{target} cannot express it"
    )


def activation_problem_weight_only(qconfig: dict[str, Any], target: str) -> str | None:
    acts = qconfig.get("activations")
    if not acts:
        return None
    return (
        f"the checkpoint quantizes activations ({acts.get('bits')}-bit, {acts.get('granularity', 'token')}); "
        f"{target} is a weight-only format and its loaders keep activations in floating point, which would "
        "silently change the model (use compressed-tensors for W8A8, or keep the native format)"
    )


def lm_head_problem(ckpt_or_qconfig: dict[str, Any], target: str, lm_head_names: tuple[str, ...]) -> str | None:
    quantized = set(ckpt_or_qconfig.get("quantized_modules") or [])
    heads = sorted(quantized & set(lm_head_names))
    if not heads:
        return None
    return (
        f"the output head ({', '.join(heads)}) is quantized; {target} loaders only replace linears inside the "
        "decoder blocks, so the head would load as a plain Linear without its weights. Quantize without "
        "--include-lm-head"
    )


def fp16_exact(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``scale`` in float16 and how many values changed (0: the conversion is exact)."""
    half = scale.to(torch.float16)
    if scale.dtype == torch.float16:
        return half, 0
    changed = int((half.to(scale.dtype) != scale).sum())
    return half, changed


def scale_dtype_problem(qconfig: dict[str, Any], target: str) -> str | None:
    """float32 scales essentially never convert exactly to the float16 that GPTQ/AWQ store."""
    dtype = ((qconfig.get("weights") or {}).get("scale_dtype")) or "float16"
    overrides = [o.get("scale_dtype") for o in (qconfig.get("module_overrides") or {}).values()]
    if dtype == "float32" or "float32" in overrides:
        return (
            f"{target} stores float16 scales and this checkpoint has float32 scales, which would be rounded "
            "(the converted weights would differ from the native ones). Quantize with --scale-dtype float16"
        )
    return None


def block_layout(names: list[str]) -> tuple[str, list[str]] | None:
    """``(block_prefix, [module suffix...])`` when ``names`` are exactly ``<prefix>.<i>.<suffix>`` for
    every block index ``i`` present and every suffix (same linears quantized in every block); else None."""
    prefix = None
    suffixes: list[str] = []
    blocks: set[str] = set()
    pattern = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
    for name in names:
        match = pattern.match(name)
        if not match or (prefix is not None and match.group(1) != prefix):
            return None
        prefix = match.group(1)
        blocks.add(match.group(2))
        if match.group(3) not in suffixes:
            suffixes.append(match.group(3))
    if prefix is None or len(set(names)) != len(blocks) * len(suffixes):
        return None
    return prefix, suffixes


def not_converted_linears(inventory: ExportInventory) -> list[str]:
    """Modules kept in floating point that a loader replacing *every* Linear must be told to skip:
    ``modules_not_converted`` plus the owner of every other 2-D ``.weight`` (embeddings included;
    listing a non-Linear is harmless)."""
    names = list(inventory.qconfig.get("modules_not_converted") or [])
    for key, shape in inventory.passthrough:
        if key.endswith(".weight") and len(shape) == 2:
            owner = key[: -len(".weight")]
            if owner not in names:
                names.append(owner)
    return names


def raise_problems(problems: list[str], target: ExportFormat, where: str) -> None:
    """One :class:`ConfigError` listing ``problems`` (the first few), or nothing when there are none."""
    if not problems:
        return
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise ConfigError(
        f"cannot convert {where} to {target.title or target.name}:\n  - " + "\n  - ".join(shown) + more,
        hint="docs/EXPORTS.md lists what each format can express",
    )


def check_convertible(qconfig: dict[str, Any], to: str, modules: list[QuantizedModule] = ()) -> None:
    """Raise :class:`ConfigError` if a checkpoint with this ``quantization_config`` cannot become ``to``.

    Works on a partial config (``weights``, ``activations``, ``transforms``, ``module_overrides``,
    ``quantized_modules`` are each optional), so ``quantize`` can refuse before any heavy work.
    ``modules`` (``quantized_module.planned_module``, from the weights' shapes) adds the per-module
    shape refusals; ``qconfig`` must then have its ``weights`` section.
    """
    target = get_format(to)
    raise_problems(target.config_problems(qconfig), target, "this checkpoint")
    problems = [f"{m.name}: {p}" for m in modules for p in target.module_problems(m, qconfig)]
    raise_problems(problems, target, "this checkpoint")


# ---------------------------------------------------------------------------------------------
# Converting
# ---------------------------------------------------------------------------------------------


def write_converted(
    src_dir: str | Path,
    dst_dir: str | Path,
    to: str,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    model_card: bool = True,
    repo_id: str | None = None,
) -> dict[str, Any]:
    """Convert the native checkpoint ``src_dir`` into the existing, empty folder ``dst_dir``.

    Writes the target's tensors and ``config.json`` and copies every other file of the source
    (tokenizer, remote code, generation config, ``qdlm_report.json``, which gains an ``export``
    record), and a model card whose loading example names ``repo_id`` (default: ``dst_dir``'s
    name; pass the final folder name when ``dst_dir`` is a staging folder). Returns the new
    ``quantization_config``. Not atomic: :func:`convert` stages it.
    """
    target = get_format(to)
    src, dst = Path(src_dir), Path(dst_dir)
    ckpt = NativeCheckpoint(src)
    try:
        raise_problems(target.config_problems(ckpt.qconfig), target, str(src))
        problems = [f"{m.name}: {p}" for m in ckpt.modules for p in target.module_problems(m, ckpt.qconfig)]
        raise_problems(problems, target, str(src))

        writer = ShardedWriter(dst, max_shard_bytes)
        done: set[str] = set()
        owner = {f"{m.name}.weight_packed": m for m in ckpt.modules}
        for key in ckpt.keys():
            if key in owner:
                m = owner[key]
                writer.add_all(m.name, target.module_tensors(m, ckpt.linear(m), ckpt.qconfig))
                done.add(m.name)
        passthrough = []
        for key in ckpt.passthrough_keys():
            writer.add(key, target.passthrough(key, ckpt.get(key)))
            passthrough.append((key, ckpt.shape(key)))
        missing = [m.name for m in ckpt.modules if m.name not in done]
        if missing:  # pragma: no cover - inspect_checkpoint guarantees weight_packed exists
            raise CheckpointError(f"modules without weight_packed: {missing[:_MAX_LISTED]}")
        writer.close()
        inventory = ExportInventory(qconfig=ckpt.qconfig, modules=list(ckpt.modules), passthrough=passthrough)
    finally:
        ckpt.close()
    return write_export_files(src, dst, target, ckpt.config, inventory, writer.manifest(),
                              model_card=model_card, repo_id=repo_id or dst.name)


def convert(src_dir: str | Path, out_dir: str | Path, to: str, *, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert the native checkpoint ``src_dir`` to format ``to`` in ``out_dir``; returns ``out_dir``.

    Atomic: written into a hidden sibling folder and moved into place when complete. Refusals
    (:class:`ConfigError`) happen before anything is written.
    """
    _check_argument("src_dir", src_dir, (str, Path), "a folder path")
    _check_argument("out_dir", out_dir, (str, Path), "a folder path")
    _check_argument("to", to, str, f"one of {', '.join(repr(t) for t in TARGETS)}")
    _check_argument("overwrite", overwrite, bool, "True or False")
    _check_argument("max_shard_bytes", max_shard_bytes, int, "a positive number of bytes")
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}", hint="pass a positive number of bytes")
    src = Path(src_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if src == out:
        raise ConfigError(f"convert writes a new folder; {out} is the source", hint="choose another output folder")
    get_format(to)  # unknown names fail before any reading
    with staged_output(out, overwrite, source=src) as tmp:
        write_converted(src, tmp, to, max_shard_bytes=max_shard_bytes, repo_id=out.name)
    return out


def _check_argument(name: str, value: Any, types: type | tuple[type, ...], accepted: str) -> None:
    """Python API arguments: a wrong type is a ConfigError (a truthy string is not ``True``)."""
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise ArgumentTypeError(
            f"convert() argument {name} must be {accepted}, got {type(value).__name__} {value!r}",
            hint=f"pass {name} as {accepted}",
        )


__all__ = [
    "FORMATS",
    "TARGETS",
    "ExportFormat",
    "ExportInventory",
    "LinearTensors",
    "NativeCheckpoint",
    "QuantizedModule",
    "check_convertible",
    "convert",
    "get_format",
    "write_converted",
]
