"""``convert``: rewrite a native qdlm checkpoint into another quantized format (GPTQ, AWQ, compressed-tensors).

A conversion never re-quantizes: it re-encodes the very codes, scales and zero points of the native
checkpoint in the target's layout, so the target's dequantized weights equal the native ones. What
a target cannot express (online transforms, a bit width, a shape, a scale it cannot store exactly)
is refused up front with a message saying what and why; docs/EXPORTS.md lists the rules.

What a target implements, and the refusals several targets share, live in :mod:`.export_format`
(``exports/gptq.py``, ``exports/awq.py``, ``exports/compressed_tensors.py`` implement it). A target encodes
one linear at a
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
from pathlib import Path
from typing import Any

from ..core import progress
from ..errors import ArgumentTypeError, CheckpointError, ConfigError
from ..format.staging import staged_output
from ..format.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from .export_folder import write_export_files
from .export_format import ExportFormat, ExportInventory
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


def get_format(to: str) -> ExportFormat:
    key = str(to).strip().lower()
    if key == NATIVE:
        raise ConfigError("the checkpoint is already in the native qdlm format", hint="choose --to gptq, awq or compressed-tensors")
    if key not in _TARGET_MODULES:
        raise ConfigError(f"unknown export format {to!r}", hint=f"choose one of {', '.join(TARGETS)}")
    return importlib.import_module(_TARGET_MODULES[key]).FORMAT


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
        with progress.step(f"converting to {to}: quantized linears", len(ckpt.modules)) as converted:
            for key in ckpt.keys():  # noqa: SIM118 - NativeCheckpoint.keys() is a method, not a dict view
                for m in ckpt.modules_at(key):  # a stacked experts projection: each expert's slice
                    writer.add_all(m.name, target.module_tensors(m, ckpt.linear(m), ckpt.qconfig))
                    done.add(m.name)
                    converted.advance()
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
