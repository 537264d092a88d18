"""The model card's Hub metadata (its YAML front matter), and the inputs a card was rendered with.

Metadata, built with huggingface_hub's ``ModelCardData``: ``license`` (given, else the source
model's own card when its folder is recorded on this machine, else, for a Hub source, the card of
that Hub repo as downloaded with its weights), ``base_model`` (given, else the
source's Hub id, else the Hub id a local source records in its README or ``config.json``
``_name_or_path``), ``base_model_relation: quantized``, ``datasets`` (a Hub calibration dataset),
``model-index`` (the ``eval`` results), ``tags``, ``library_name`` and ``pipeline_tag``.

A card shows every input it was rendered with that is not in the checkpoint's files: the loading
example names its target, the front matter its license and base model. :func:`card_inputs` reads
them back, so ``eval`` and ``push`` can re-render a card with the same inputs to tell whether someone
edited it, wherever the folder has been copied since and whatever the source machine had.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..format.report import looks_like_hub_id, recorded_local_source

# The loading example's first `from_pretrained("TARGET"` names the repo id (or folder) the card was rendered for.
_LOAD_TARGET = re.compile(r'\.from_pretrained\("([^"\n]+)"')


@dataclass(frozen=True)
class CardInputs:
    """What a card is rendered with besides the folder's files. ``None``: found from the folder and
    its recorded source; ``""``: none (for ``license`` and ``base_model``)."""

    repo_id: str | None = None  # the loading example's target: the Hub repo, else the folder's name
    license: str | None = None
    base_model: str | None = None


def card_inputs(text: str) -> CardInputs:
    """The inputs the card ``text`` shows it was rendered with (absent ones as ``""``)."""
    try:
        data = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - a card without readable metadata simply names none
        data = {}
    target = _LOAD_TARGET.search(text)
    license_ = data.get("license")
    base = data.get("base_model")
    return CardInputs(
        repo_id=target.group(1) if target else None,
        license=license_ if isinstance(license_, str) else "",
        base_model=base if isinstance(base, str) else "",
    )


def _source_card_metadata(folder: Path) -> dict[str, Any]:
    """Front matter of the recorded local source's README.md, plus its ``config.json`` ``_name_or_path``."""
    recorded = recorded_local_source(folder)
    if recorded is None or not Path(recorded).is_dir():
        return {}
    found = _front_matter(Path(recorded) / "README.md")
    try:
        name = json.loads((Path(recorded) / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if looks_like_hub_id(name):
        found["_name_or_path"] = name
    return found


def _hub_card_metadata(repo_id: str) -> dict[str, Any]:
    """The front matter of the Hub model ``repo_id``'s card (its README.md) as huggingface_hub's cache
    holds it: quantizing from a Hub id downloads the card with the weights. Never a network request
    (rendering a card must not wait on one); nothing when the card is not cached or cannot be read:
    the card then shows no license rather than a guess, and ``--license`` sets one."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "README.md")
    return _front_matter(Path(cached)) if isinstance(cached, str) else {}


def _front_matter(readme: Path) -> dict[str, Any]:
    """A model card's front matter; nothing when the file is absent or unreadable."""
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - someone else's card: unreadable metadata just gives nothing
        return {}


def resolve_inputs(folder: Path, source: Any, given: CardInputs) -> tuple[str | None, str | None]:
    """``(license, base_model)`` for the card: what was given, else what the source says."""
    needs_source = given.license is None or (given.base_model is None and not looks_like_hub_id(source))
    meta = _source_card_metadata(folder) if needs_source else {}
    if given.license is None and "license" not in meta and looks_like_hub_id(source):
        meta = {**_hub_card_metadata(source), **meta}  # the base model's card on the Hub
    license_ = given.license if given.license is not None else meta.get("license")
    if given.base_model is not None:
        base = given.base_model
    elif looks_like_hub_id(source):
        base = source
    else:  # a local source: the Hub id its own card or config records, when it has one
        recorded = meta.get("base_model")
        base = next((b for b in (recorded, meta.get("_name_or_path")) if looks_like_hub_id(b)), None)
    return (license_ if isinstance(license_, str) and license_ else None), (base or None)


def model_index(eval_table: Any, model_name: str) -> list[EvalResult]:
    """One ``EvalResult`` per row of the ``eval`` table (``task/metric[:filter]`` -> the quantized value)."""
    results = []
    if not isinstance(eval_table, dict):
        return results
    for row in sorted(eval_table):
        entry = eval_table[row]
        value = entry.get("quantized") if isinstance(entry, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        task, _, metric = str(row).partition("/")
        results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                  metric_type=metric or task, metric_value=value))
    return results


def front_matter(*, license_: str | None, base_model: str | None, calibration_dataset: Any, eval_table: Any,
                 model_name: str, tags: list[str], pipeline_tag: str | None) -> str:
    """The YAML front matter of the card (with its ``---`` fences)."""
    results = model_index(eval_table, model_name)
    data = ModelCardData(
        license=license_,
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        datasets=[calibration_dataset] if looks_like_hub_id(calibration_dataset) else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"
