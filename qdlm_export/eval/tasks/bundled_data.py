"""Helpers the bundled task YAMLs call (``!function bundled_data.load_bundled``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_bundled(data_files: dict[str, str] | str | None = None, **_: Any):
    """``datasets.DatasetDict`` of the JSON-lines ``data_files`` (split -> file name in this folder).

    lm-eval passes the task's ``dataset_kwargs`` (and its metadata, ignored here). Relative names are
    resolved against this folder rather than the working directory, and the rows are read directly,
    so nothing touches the network or the datasets cache.
    """
    import datasets

    if data_files is None:
        raise ValueError("the task's dataset_kwargs need data_files: {split: file.jsonl}")
    if isinstance(data_files, str):
        data_files = {"test": data_files}
    splits = {}
    for split, name in data_files.items():
        path = Path(name)
        if not path.is_absolute():
            path = HERE / path
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
