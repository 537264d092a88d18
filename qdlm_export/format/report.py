"""``qdlm_report.json`` (docs/FORMAT.md): what a run measured, and the manifest of every tensor the
weight files were written with. The one builder and reader of the report."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .spec import LOCAL_SOURCE_FILE, REPORT_FILE
from .tensor_headers import DAMAGED_HINT, TensorEntry

MANIFEST_KEY = "tensors"  # every tensor the writer wrote, name -> {"dtype", "shape"}
DISPLAY_NAMES_KEY = "display_names"  # {"method", "family"}: how the model card names them
# owner/name as the Hub spells it (validate_repo_id's rules, minus the length check).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: Any) -> bool:
    """True for ``owner/name`` ids; False for local paths and bare names."""
    return (
        isinstance(name, str)
        and bool(_HUB_ID.match(name))
        and ".." not in name
        and "--" not in name
        and not name.endswith((".git", "."))
    )


def _is_machine_path(text: str) -> bool:
    """A path that says where things are on this machine: absolute, home-relative, or climbing out."""
    return text.startswith(("/", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", text)) or ".." in Path(text).parts


def public_name(value: str) -> str:
    """What published files (config, report, card) say for a model or dataset: a Hub id or a relative
    path as given; an absolute local path as its folder name (``"local"`` when it has none)."""
    text = str(value)
    if not _is_machine_path(text):
        return text
    return Path(os.path.expanduser(text)).resolve().name or "local"


def public_command(command: str) -> str:
    """The command line with every absolute local path (also in ``--opt=PATH``) reduced to its name."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: keep the words as they are
        words = command.split()
    out = []
    for word in words:
        option, eq, value = word.partition("=") if word.startswith("-") else ("", "", word)
        out.append(option + eq + public_name(value) if value and _is_machine_path(value) else word)
    return " ".join(shlex.quote(w) for w in out)


def build_report(*, source: str, linear_params: int, linear_bytes_original: int, linear_bytes_quantized: int,
                 checkpoint_bytes: int, source_checkpoint_bytes: int, relative_output_error: float | None,
                 calibration: dict[str, Any] | None, seconds_per_block: list[float], elapsed_s: float,
                 compat_repairs: list[str], manifest: dict[str, Any],
                 display_names: dict[str, str] | None = None,
                 calibration_fallbacks: dict[str, str] | None = None) -> dict[str, Any]:
    """The report of a quantization run, with its fields in the documented order."""
    return {
        "source": source,
        "linear_params": linear_params,
        "linear_bytes_original": linear_bytes_original,
        "linear_bytes_quantized": linear_bytes_quantized,
        "checkpoint_bytes": checkpoint_bytes,
        "source_checkpoint_bytes": source_checkpoint_bytes,
        "bits_per_weight": round(8 * linear_bytes_quantized / max(linear_params, 1), 4),
        "relative_output_error": relative_output_error,
        "calibration": calibration,
        # linears quantized without calibration, and why (a routed expert no calibration token reached)
        "calibration_fallbacks": dict(sorted((calibration_fallbacks or {}).items())),
        "seconds_per_block": [round(s, 3) for s in seconds_per_block],
        "elapsed_s": round(elapsed_s, 2),
        "eval": None,
        "compat_repairs": compat_repairs,
        DISPLAY_NAMES_KEY: dict(display_names or {}),
        MANIFEST_KEY: manifest,  # what inspect/push/eval check is still there
    }


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def read_report(folder: Path) -> dict[str, Any] | None:
    """The report written beside a checkpoint; None when absent or unreadable (it is informational)."""
    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None



def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The tensor manifest in ``folder``'s ``qdlm_report.json`` (``"tensors"``), checked for form;
    None when the report or the entry is absent (a folder written before the manifest existed) or
    the report is not readable JSON (the report is otherwise informational)."""
    path = folder / REPORT_FILE
    report = read_report(folder)
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


def record_local_source(folder: str | Path, source_path: str | Path) -> None:
    """Remember where the source model lives on this machine, so ``eval`` finds it from any directory
    (``qdlm_source.local``: never uploaded, never part of an export)."""
    (Path(folder) / LOCAL_SOURCE_FILE).write_text(
        json.dumps({"source_path": str(Path(source_path).expanduser().resolve())}) + "\n", encoding="utf-8"
    )


def recorded_local_source(folder: str | Path) -> str | None:
    try:
        data = json.loads((Path(folder) / LOCAL_SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = data.get("source_path") if isinstance(data, dict) else None
    return path if isinstance(path, str) and path else None
