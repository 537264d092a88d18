"""``eval --output-path DIR``: lm-eval's results JSON for each model (and its per-sample logs with
``--log-samples``), as lm-eval's own ``--output_path`` writes them, plus the comparison table.

Layout: ``DIR/original/results.json``, ``DIR/quantized/results.json``,
``DIR/<model>/samples_<task>.jsonl`` and ``DIR/comparison.json``. ``DIR`` is checked before any
work: it may be new, empty, or a previous ``--output-path`` of this command (it holds
:data:`MARKER`, the list of files it wrote); anything else is refused, so no one's files are ever
overwritten. A rerun replaces the files the previous run listed and nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError

MARKER = ".qdlm-eval-output.json"
MODELS = ("original", "quantized")


def _listed_files(folder: Path) -> list[str] | None:
    """The files a previous run wrote into ``folder`` (from its marker), or None when it has none."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else None


def check_output_path(path: str | Path) -> Path:
    """``path`` resolved, refused when it is a file or a folder with content this command did not write."""
    folder = Path(path).expanduser().resolve()
    hint = "choose a new or empty folder for --output-path (or a previous --output-path of `qdlm-export eval`)"
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"--output-path {folder} is a file, not a folder", hint=hint)
    if folder.is_dir() and any(folder.iterdir()) and _listed_files(folder) is None:
        raise OutputExistsError(f"--output-path {folder} is not empty and was not written by `qdlm-export eval`",
                                hint=hint)
    return folder


def _write(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _safe_task_name(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task)


def write_outputs(folder: Path, per_model: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> list[Path]:
    """Write each model's lm-eval results (and samples, when present) and the comparison into
    ``folder`` (checked by :func:`check_output_path`). Returns the files written."""
    folder = check_output_path(folder)  # again: another run may have written there meanwhile
    for name in _listed_files(folder) or []:
        old = (folder / name).resolve()
        if old.parent != folder and folder not in old.parents:
            continue  # a marker edited to point outside: never delete there
        old.unlink(missing_ok=True)
    written: list[Path] = []
    for model, result in per_model.items():
        target = folder / model / "results.json"
        _write(target, json.dumps(result.get("results", {}), indent=2, ensure_ascii=False) + "\n")
        written.append(target)
        for task, samples in (result.get("samples") or {}).items():
            target = folder / model / f"samples_{_safe_task_name(task)}.jsonl"
            _write(target, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
            written.append(target)
    target = folder / "comparison.json"
    _write(target, json.dumps(comparison, indent=2) + "\n")
    written.append(target)
    _write(folder / MARKER, json.dumps({"tool": "qdlm-export eval",
                                        "files": [str(p.relative_to(folder)) for p in written]}, indent=2) + "\n")
    return written
