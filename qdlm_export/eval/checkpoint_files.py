"""What ``eval`` reads from and writes into a quantized checkpoint's folder: the original model it
was made from (its provenance, and the absolute path of a local source recorded beside it), and the
eval table stored in ``qdlm_report.json`` and the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..format.report import recorded_local_source
from ..format.spec import REPORT_FILE
from ..hub.card import CARD_FILE, is_generated_card, looks_like_hub_id, regenerated_inputs, write_model_card

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not readable JSON ({e}).", hint=f"run `qdlm-export inspect {path.parent}`, or restore the file"
        ) from None
    return data if isinstance(data, dict) else {}


def original_of(quantized_dir: str | Path) -> str:
    """The original model a quantized checkpoint was made from (its provenance ``source``)."""
    folder = Path(quantized_dir)
    config = _read_json(folder / "config.json")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(
            f"{folder} is not a quantized checkpoint (config.json has no quantization_config).",
            hint="Pass a folder written by `qdlm-export quantize`.",
        )
    provenance = qc.get("provenance") or {}
    source = provenance.get("source")
    if not source:
        raise CheckpointError(
            f"{folder}/config.json does not say which model it was made from (no provenance.source).",
            hint="Pass the original model with --original.",
        )
    recorded = recorded_local_source(folder)
    if recorded is not None and Path(recorded).is_dir():
        return recorded  # the absolute path quantize saw: found from any working directory
    if Path(str(source)).expanduser().exists():
        return str(source)
    if provenance.get("source_kind") == "local" or recorded is not None or not looks_like_hub_id(source):
        where = f" (at {recorded} when it was quantized)" if recorded else ""
        raise CheckpointError(
            f"{folder} was made from the local model folder {source}{where}, which is not found from "
            f"{Path.cwd()}.",
            hint="Pass the original model folder with --original PATH.",
        )
    return str(source)


# Where quantize records the absolute path of a local source. `push` uploads an allow-list of
# suffixes (hub.UPLOAD_SUFFIXES) that ".local" is not on, so no local path is ever published.


def check_original(source: str) -> None:
    if not Path(source).expanduser().exists() and not looks_like_hub_id(source):
        raise CheckpointError(
            f"The original model {source} (from the checkpoint's provenance) does not exist here.",
            hint="Pass the original model folder or Hub id with --original.",
        )


def _card_is_generated(folder: Path) -> bool:
    """README.md is what qdlm-export renders for the folder's files now, with the inputs the card shows
    (its repo id or folder name, license, base model): unedited, also after the folder was copied."""
    return is_generated_card(folder)


def write_eval(folder: str | Path, table: dict[str, Any], settings: dict[str, Any]) -> str:
    """Store ``table`` in ``qdlm_report.json`` and refresh the model card.

    Returns what happened to README.md: ``"regenerated"`` (it was the generated card, or missing),
    or ``"kept"`` (it was edited by hand: left as is).
    """
    folder = Path(folder)
    card = folder / CARD_FILE
    regenerate = not card.exists() or _card_is_generated(folder)
    inputs = regenerated_inputs(folder) if card.exists() else None
    report_path = folder / REPORT_FILE
    report = _read_json(report_path) if report_path.is_file() else {}
    report["eval"] = table
    report["eval_settings"] = settings
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if regenerate:
        if inputs is None:
            write_model_card(folder)
        else:  # keep what the card was rendered with: a pushed card's repo id, its license and base model
            write_model_card(folder, inputs.repo_id, license=inputs.license, base_model=inputs.base_model)
        return "regenerated"
    logger.warning("%s was edited by hand; the eval table went into %s only.", card, REPORT_FILE)
    return "kept"
