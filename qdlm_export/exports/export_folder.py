"""Everything of an export folder but its tensors: ``config.json`` with the target's
``quantization_config``, the model's own files carried over from the native folder, the report
(with an ``export`` record) and the model card. Shared by ``convert DIR`` and ``quantize --format``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..format.model_files import copyable_model_files
from ..format.report import read_report, write_report
from ..format.spec import CARD_FILE
from ..loader.native_wrappers import is_generated, strip_added_code, unwrap_config

if TYPE_CHECKING:
    from .export_format import ExportFormat, ExportInventory

# Appended to an export's remote-code modules when their published code needs repairs (below).
COMPAT_MARKER = "# qdlm-export compat repairs"
COMPAT_CALL = (
    f"\n\n{COMPAT_MARKER}: in-memory repairs of this published code for the installed transformers\n"
    "# ({file}.py, a copy of qdlm_export/families/compat.py); no quantization code, nothing to install.\n"
    "from .{file} import repair_module as _qdlm_repair_module\n\n"
    "_qdlm_repair_module(globals())\n"
)
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def write_export_files(native_dir: Path, dst: Path, target: ExportFormat, native_config: dict[str, Any],
                       inventory: ExportInventory, manifest: dict[str, Any], *, model_card: bool,
                       repo_id: str) -> dict[str, Any]:
    """Write the non-tensor files of the export in ``dst`` from the native folder ``native_dir`` (its
    model files, report and card; its weights are not read). Returns the target's ``quantization_config``."""
    qconfig = target.quantization_config(inventory)
    config = unwrap_config(native_config)  # the source's model_type/architectures: stock loaders build it
    config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The same allow-list as quantize: code, tokenizer, generation config, license; never pickles,
    # hidden files, folders or symlinks out of the checkpoint (config, report and card are written here).
    for f in copyable_model_files(native_dir):
        if _is_weight_file(f.name) or is_generated(f):  # is_generated: the native format's wrapper/loader files
            continue
        shutil.copy2(f, dst / f.name)
        if f.suffix == ".py":  # remote code without the qdlm loader registration or guard appended to it
            (dst / f.name).write_text(strip_added_code(f.read_text(encoding="utf-8")), encoding="utf-8")
    _carry_compat_repairs(native_dir, dst, config)
    _write_report(native_dir, dst, target, inventory.qconfig, manifest)
    if model_card:
        _write_card(native_dir, dst, target, config, repo_id)
    return qconfig


def _carry_compat_repairs(native_dir: Path, dst: Path, config: dict[str, Any]) -> list[Path]:
    """Published remote code that the installed transformers cannot run as is (LLaDA2's and
    LLaDA-MoE's: a list ``_tied_weights_keys``, no ``ROPE_INIT_FUNCTIONS["default"]``...) loads in the
    native checkpoint because the self-contained loader repairs it in memory (docs/EXPORTS.md). An
    export drops that loader, so when the quantize run needed repairs (the report's
    ``compat_repairs``), the export carries the repairs alone: ``qdlm_compat.py`` (a copy of
    ``families/compat.py``, torch and transformers only) and a call to it at the end of each
    remote-code module of ``auto_map``. The target's own quantizer still loads the weights. Returns
    the files written or changed."""
    report = read_report(native_dir) or {}
    auto_map = config.get("auto_map")
    if not report.get("compat_repairs") or not isinstance(auto_map, dict):
        return []
    from ..loader.selfcontained import COMPAT_FILE, loader_files

    changed = [dst / f"{COMPAT_FILE}.py"]
    changed[0].write_text(loader_files()[f"{COMPAT_FILE}.py"], encoding="utf-8")
    for key, ref in auto_map.items():
        if not (key.startswith("AutoModel") or key == "AutoConfig"):
            continue  # tokenizers and processors build no model
        for value in ref if isinstance(ref, (list, tuple)) else [ref]:
            path = dst / (str(value).rsplit(".", 1)[0] + ".py")
            if "--" in str(value) or not path.is_file() or path in changed:
                continue  # code in another repository (nothing here to append to), or a module already done
            text = path.read_text(encoding="utf-8")
            if COMPAT_MARKER not in text:
                path.write_text(text.rstrip("\n") + COMPAT_CALL.format(file=COMPAT_FILE), encoding="utf-8")
                changed.append(path)
    return changed


def _is_weight_file(name: str) -> bool:
    return bool(_WEIGHT_FILE.match(name)) or name.endswith(".safetensors")


def _write_report(src: Path, dst: Path, target: ExportFormat, native_qconfig: dict[str, Any],
                  manifest: dict[str, Any]) -> None:
    report = read_report(src) or {}
    report["export"] = {"format": target.name, "native_quantization_config": native_qconfig}
    report["tensors"] = manifest  # this folder's tensors, not the native source's (docs/FORMAT.md)
    write_report(dst, report)


def _write_card(src: Path, dst: Path, target: ExportFormat, config: dict[str, Any], repo_id: str) -> None:
    """The native card, rendered from the source, adapted to the target: its tag and title, and its
    own "How to load" and "Format" sections.

    ``hub.card.render_model_card`` describes the native format (it reads the native config and report
    from the source folder); the target-specific parts are swapped in here.
    """
    try:
        from ..hub.card import render_model_card

        text = render_model_card(src, repo_id=repo_id)
    except Exception:  # noqa: BLE001 - the card is informational: never fail a conversion over it
        text = (src / CARD_FILE).read_text() if (src / CARD_FILE).is_file() else f"# {repo_id}\n"
    text = text.replace("\ntags:\n", f"\ntags:\n- {target.name}\n", 1)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("# ") and line.rstrip().endswith("(qdlm)"):
            lines[i] = line.rstrip()[: -len("(qdlm)")] + f"({target.title})"
            break
    text = "\n".join(lines)
    text = _replace_section(text, "## How to load", target.how_to_load(repo_id, config))
    text = _replace_section(text, "## Format", target.format_note())
    (dst / CARD_FILE).write_text(text)


def _replace_section(text: str, heading: str, body: str) -> str:
    if not body:
        return text
    body = body.rstrip("\n") + "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + body
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + tail if tail else "")
