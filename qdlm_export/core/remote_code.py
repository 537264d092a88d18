"""Whether loading a folder would run Python code shipped in it, and refusing that unless allowed.

transformers runs a folder's own ``.py`` files when its ``config.json`` (or ``tokenizer_config.json``)
names classes in ``auto_map`` that transformers does not have itself, and the caller passes
``trust_remote_code=True``. Commands that load checkpoints (``eval``, ``bench``) check here first,
so the refusal names the files and says how to allow them, instead of silently running them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def needs_remote_code(config: dict[str, Any]) -> bool:
    """Whether building the model of ``config`` (a config.json dict) runs code shipped beside it: an
    ``auto_map`` for a model type the installed transformers does not have itself."""
    if not config.get("auto_map"):
        return False
    from transformers import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def remote_code_files(folder: str | Path) -> list[str] | None:
    """The ``.py`` files loading ``folder`` would run (all of the folder's ``.py`` files, as any may be
    imported by the ones ``auto_map`` names), ``[]`` when it loads with transformers' own classes, or
    ``None`` when ``folder`` is not a local folder (a Hub id: transformers itself refuses then)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return None
    config = _read_json(path / "config.json")
    tokenizer = _read_json(path / "tokenizer_config.json")
    if not (needs_remote_code(config) or tokenizer.get("auto_map")):
        return []
    return sorted(p.name for p in path.glob("*.py")) or ["the classes its auto_map names"]


def require_trust(folder: str | Path, trust_remote_code: bool, *, what: str = "the checkpoint") -> None:
    """Raise ``UnsupportedModelError`` naming the files when loading ``folder`` would run its code and
    ``trust_remote_code`` is False."""
    if trust_remote_code:
        return
    files = remote_code_files(folder)
    if files:
        raise UnsupportedModelError(
            f"{what} {folder} runs its own Python code to load ({', '.join(files)})",
            hint="review that code, then re-run with --trust-remote-code to allow it",
        )


def refusal_from_transformers(exc: Exception, name: str) -> UnsupportedModelError | None:
    """transformers' own refusal to run a Hub repo's code without ``trust_remote_code``, as our error."""
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return UnsupportedModelError(
            f"{name} runs its own Python code to load (transformers refused it without trust_remote_code)",
            hint="review that code, then re-run with --trust-remote-code to allow it",
        )
    return None
