"""Offline lm-eval tasks bundled with qdlm-export.

* ``qdlm_stdlib_mc`` (multiple choice, 48 questions): which of four names does a standard-library
  module provide? The context is ``"<module>."`` and each choice is a name, so the model scores the
  dotted titles it saw in the stdlib docstring corpus. Metrics: ``acc``, ``acc_norm``.
* ``qdlm_stdlib_gen`` (generation, 40 prompts): given a docstring title (``"shutil.copymode"``),
  generate its first three words (``"Copy mode bits"``). Metric: ``exact_match`` on the first three
  words of the answer, ignoring case and punctuation.

Both read JSON-lines files from this folder (``dataset_path: json`` with ``data_files``, loaded by
``bundled_data.load_bundled`` relative to this folder), so no Hub access is needed. Both carry the tag
``qdlm_offline``. Use them with ``lm_eval.tasks.TaskManager(include_path=tasks_dir())`` or
``lm_eval --include_path $(python -c 'from qdlm_export.eval.tasks import tasks_dir; print(tasks_dir())')``.
"""

from __future__ import annotations

from pathlib import Path

MC_TASK = "qdlm_stdlib_mc"
GEN_TASK = "qdlm_stdlib_gen"
OFFLINE_TASKS = (MC_TASK, GEN_TASK)


def tasks_dir() -> Path:
    """The folder holding the bundled task YAMLs and their data (for ``TaskManager(include_path=...)``)."""
    return Path(__file__).resolve().parent
