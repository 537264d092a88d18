"""What ``push`` uploads and deletes: the allow-list of a checkpoint's files, narrowed by
``--include``/``--exclude`` patterns, and the files on the Hub the new upload makes stale."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from ..format.reader import INDEX_FILE, link_roots, stays_inside
from ..format.validation import ValidCheckpoint

# What a checkpoint repo is made of besides its weights (top-level files only): configs, tokenizer
# files, remote code and the loader copies, model card, license texts, chat templates.
UPLOAD_SUFFIXES = (".json", ".py", ".txt", ".model", ".md", ".jinja", ".tiktoken", ".yaml", ".yml")
UPLOAD_PREFIXES = ("LICENSE", "NOTICE", "COPYING")
# Never uploaded, whatever their name: pickles can run code when loaded.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt")
# Weight files a loader picks up by name on the Hub: any of them the new upload does not replace is
# stale (a single model.safetensors left beside new shards, or old shards beside a single file).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                   "*.ckpt", "*.pkl", "*.pickle")


def upload_plan(checked: ValidCheckpoint) -> tuple[list[tuple[str, Path]], list[str]]:
    """``([(path in repo, local file)], [left-out entries])``: the allow-list of what ``push`` uploads.

    Uploaded: the weight files the checkpoint loads (its index's shards, or ``model.safetensors``),
    the index, and top-level files with a model-repo suffix (:data:`UPLOAD_SUFFIXES`) or a license
    name. Left out: pickles, hidden files, sub-folders, safetensors the index does not list, anything
    else. Symlinks are only followed inside the folder (the validation refused the others)."""
    folder = checked.folder
    roots = link_roots(folder)
    take: dict[str, Path] = {f.relative_to(folder).as_posix(): f for f in checked.weight_files}
    skipped: list[str] = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name in take:
            continue
        if name.startswith("."):
            if name not in (".git", ".cache"):
                skipped.append(name)
        elif entry.is_dir():
            skipped.append(name + "/")
        elif not entry.is_file() or not stays_inside(entry, roots):
            skipped.append(name)
        elif name == INDEX_FILE:
            take[name] = entry
        elif name.lower().endswith(PICKLE_SUFFIXES) or name.endswith(".safetensors"):
            skipped.append(name)
        elif name.endswith(UPLOAD_SUFFIXES) or name.startswith(UPLOAD_PREFIXES):
            take[name] = entry
        else:
            skipped.append(name)
    return sorted(take.items()), skipped


def matches(path: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """``path`` (in the repo) matches one of the glob ``patterns`` (a pattern ending in "/" is a folder)."""
    return any(fnmatch(path, p) or (p.endswith("/") and path.startswith(p)) for p in patterns)


def filter_plan(files: list[tuple[str, Path]], include: list[str], exclude: list[str]) -> tuple[list, list[str]]:
    """``files`` narrowed to ``include`` (all when empty), less ``exclude``; and the names filtered out."""
    kept, dropped = [], []
    for name, path in files:
        if (include and not matches(name, include)) or matches(name, exclude):
            dropped.append(name)
        else:
            kept.append((name, path))
    return kept, dropped


def stale_files(remote: list[str], uploading: set[str], delete: list[str], *, weights: bool) -> list[str]:
    """Files on the Hub to delete in the same commit: those matching ``delete``, and (``weights``)
    weight files and indexes the upload does not replace. Files being uploaded are never deleted."""
    patterns = list(delete) + (list(WEIGHT_PATTERNS) if weights else [])
    return sorted(p for p in remote if p not in uploading and matches(p, patterns))
