"""The original model's evaluation results, kept between ``eval`` runs.

Two checkpoints of one original are usually evaluated one after the other; the original's scores
do not change, so the second run reads them from a JSON file instead of evaluating it again. An
entry is reused only when everything that changes the numbers matches: the model (Hub id and the
commit its files came from, or the resolved local folder and its files' sizes and times), the
tokenizer files both models are evaluated with, the tasks (and the task YAMLs of ``include_path``),
``limit``, ``num_fewshot``, seeds, ``mc_num``, ``batch_size``, the ``qdlm`` model arguments, the
NLL settings, dtype, device, and the lm-eval and qdlm-export versions.

The folder is ``$QDLM_CACHE/eval``, else ``$XDG_CACHE_HOME/qdlm-export/eval`` (``~/.cache/...``).
Entries are plain JSON, one file per key; a corrupt or unreadable entry is ignored (re-evaluated).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV = "QDLM_CACHE"
# Files whose content decides the tokens both models see (eval uses the checkpoint's tokenizer for both).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja")


def cache_dir() -> Path:
    """Where the entries live (created on first write)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "eval"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qdlm-export" / "eval"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _folder_files(folder: Path) -> list[list[Any]]:
    """Name, size and modification time of every file at the top of a model folder: a rebuilt or
    re-downloaded model gets a new key without hashing gigabytes of weights."""
    rows = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            rows.append([path.name, stat.st_size, stat.st_mtime_ns])
    return rows


def _hub_commit(repo_id: str) -> str | None:
    """The commit of the default branch in the local Hub cache (what loading would read offline)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
        return ref.read_text().strip() if ref.is_file() else None
    except (ImportError, OSError):
        return None


def model_identity(source: str) -> dict[str, Any]:
    """The original model as the key sees it: a local folder by resolved path and files, a Hub id
    by name and cached commit."""
    path = Path(source).expanduser()
    if path.exists():
        resolved = path.resolve()
        return {"path": str(resolved), "files": _folder_files(resolved) if resolved.is_dir() else None}
    return {"hub_id": source, "revision": _hub_commit(source)}


def tokenizer_digest(folder: Path) -> str:
    """One hash over the tokenizer files of ``folder``."""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def include_path_digest(include_path: Any) -> list[list[str]] | None:
    """The task YAMLs of ``include_path`` folders, hashed: editing a task gives a new key."""
    if include_path is None:
        return None
    folders = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    rows = []
    for folder in folders:
        root = Path(folder).expanduser().resolve()
        for path in sorted(root.rglob("*.yaml")) if root.is_dir() else [root]:
            rows.append([str(path), _digest(path.read_bytes()) if path.is_file() else ""])
    return rows


def entry_path(key: dict[str, Any]) -> Path:
    return cache_dir() / (_digest(json.dumps(key, sort_keys=True).encode()) + ".json")


def lookup(key: dict[str, Any], *, need_samples: bool = False) -> dict[str, Any] | None:
    """The stored result for ``key``, or None (none stored, a different key, no samples when
    ``need_samples``, or an unreadable file)."""
    path = entry_path(key)
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the unreadable cached eval result %s (%s)", path, exc)
        return None
    if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
        return None
    result = entry.get("result")
    if not isinstance(result, dict) or "values" not in result or (need_samples and "samples" not in result):
        return None
    return result


def store(key: dict[str, Any], result: dict[str, Any]) -> Path | None:
    """Write ``result`` under ``key`` atomically; a cache that cannot be written only logs a warning
    (the evaluation itself succeeded)."""
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": key, "result": result}, f)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)  # gone after the rename; a partial file otherwise
        return path
    except OSError as exc:
        logger.warning("could not store the original model's eval results in %s (%s)", path.parent, exc)
        return None
