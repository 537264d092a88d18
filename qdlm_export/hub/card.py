"""README.md (model card) for a quantized checkpoint, built from its ``config.json`` and ``qdlm_report.json``.

The card has Hub metadata in YAML front matter (hub/card_metadata.py: ``license``, ``base_model``,
``base_model_relation: quantized``, ``datasets``, ``model-index``, ``library_name``, ``tags``) and a
short body: how the checkpoint was made, how to load it (as this checkpoint loads: self-contained,
or with qdlm-export), sizes, quality, and a pointer to the format description. Output depends only
on the folder's files and the :class:`CardInputs`, so rendering the same folder twice gives the same
text, and no absolute local path is ever shown (a local source appears as its folder name). Names for people (``GPTQ``, ``LLaDA``) come
from the report, where ``quantize`` records them from the method class and the family adapter: the
card knows no method or family by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..format.report import DISPLAY_NAMES_KEY, looks_like_hub_id, public_command, public_name
from ..format.spec import CARD_FILE, REPORT_FILE
from .card_metadata import CardInputs, card_inputs, front_matter, resolve_inputs

__all__ = ["CARD_FILE", "CardInputs", "card_inputs", "is_generated_card", "looks_like_hub_id", "render_model_card",
           "write_model_card"]

PROJECT_URL = "https://pypi.org/project/qdlm-export/"
FORMAT_DOC = "docs/FORMAT.md"

# The report's names for people ({"method": "GPTQ", "family": "LLaDA"}), recorded by `quantize` from
# the method class and the family adapter that own them; absent, the card uses the config's keys.
# The loader copy a self-contained checkpoint carries (loader/selfcontained.py LOADER_FILE); the hub
# layer may not import the loader, so the name is repeated here.
SELF_CONTAINED_LOADER = "qdlm_loader.py"


# ----------------------------------------------------------------------------------- reading
def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(
                f"{path} does not exist, so no model card can be written for {path.parent}.",
                hint="Write a checkpoint first: `qdlm-export quantize MODEL --out DIR`.",
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not readable JSON ({e}).", hint=f"Run `qdlm-export inspect {path.parent}`."
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} should hold a JSON object, found {type(data).__name__}.",
            hint=f"restore the file, or re-create the checkpoint; `qdlm-export inspect {path.parent}` checks the rest",
        )
    return data


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------------- formatting
def human_bytes(n: float) -> str:
    """Decimal units, as the Hub shows file sizes: 13958643712 -> '13.96 GB'."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    size, i = float(n), 0
    while abs(size) >= 1000 and i < len(units) - 1:
        size /= 1000
        i += 1
    return f"{int(size)} B" if i == 0 else f"{size:.2f} {units[i]}"


def _fmt(value: Any) -> str:
    num = _number(value)
    if num is None:
        return "—" if value is None else str(value)
    return f"{num:.4g}" if num != int(num) or abs(num) >= 1e6 else str(int(num))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------- the facts
class _Facts:
    """Everything the card says, read defensively: every key may be missing."""

    def __init__(self, config: dict[str, Any], report: dict[str, Any], self_contained: bool):
        self.config, self.report, self.self_contained = config, report, self_contained
        q = self.qc = _dict(config.get("quantization_config"))
        prov = _dict(q.get("provenance"))
        source = prov.get("source") or report.get("source")
        # checkpoints written before paths were scrubbed may record an absolute path: show its name
        self.source = public_name(source) if isinstance(source, str) and source else None
        self.base_model: str | None = None  # set by render_model_card (given, or from the source)
        self.license: str | None = None
        self.tool_version = prov.get("tool_version")
        command = prov.get("command")
        self.command = public_command(command) if isinstance(command, str) and command else None
        self.method = str(q.get("method") or "unknown")
        w = _dict(q.get("weights"))
        self.bits = w.get("bits")
        self.group_size = w.get("group_size")
        self.symmetric = w.get("symmetric")
        self.scale_dtype = w.get("scale_dtype")
        acts = q.get("activations")
        self.act = _dict(acts)
        self.act_bits = self.act.get("bits") if acts else None
        self.family = q.get("family")
        self.names = _dict(report.get(DISPLAY_NAMES_KEY))
        self.auto_map = config.get("auto_map")
        archs = config.get("architectures")
        self.architecture = archs[0] if isinstance(archs, list) and archs else None

    @property
    def scheme(self) -> str:
        return f"w{self.bits}a{self.act_bits or 16}"

    @property
    def model_name(self) -> str:
        if isinstance(self.source, str) and self.source.strip("/"):
            return self.source.rstrip("/").rsplit("/", 1)[-1]
        return self.architecture or "Model"

    @property
    def method_name(self) -> str:
        name = self.names.get("method")
        return name if isinstance(name, str) and name else self.method

    @property
    def family_name(self) -> str | None:
        if not self.family:
            return None
        name = self.names.get("family")
        return name if isinstance(name, str) and name else str(self.family)

    @property
    def needs_no_calibration(self) -> bool:
        """The run recorded that its method used no calibration data (``"calibration": null``)."""
        return "calibration" in self.report and self.report["calibration"] is None

    def tags(self) -> list[str]:
        tags = ["qdlm", "qdlm-export", "quantized", self.method.lower()]
        if self.bits is not None:
            tags += [f"{self.bits}-bit", self.scheme]
        tags += ["diffusion", "diffusion-llm"]
        if isinstance(self.family, str) and self.family:
            tags.append(self.family.lower())
        return list(dict.fromkeys(tags))

    def pipeline_tag(self) -> str | None:
        # A diffusion LM generates text; say so only when the config shows it is one.
        if self.family or self.qc.get("dllm"):
            return "text-generation"
        return None


# ----------------------------------------------------------------------------------- sections
def _front_matter(f: _Facts) -> str:
    calib = _dict(f.report.get("calibration"))
    return front_matter(license_=f.license, base_model=f.base_model, calibration_dataset=calib.get("dataset"),
                        eval_table=f.report.get("eval"), model_name=f.model_name, tags=f.tags(),
                        pipeline_tag=f.pipeline_tag())


def _title(f: _Facts) -> str:
    bits = f" {f.scheme.upper()}" if f.bits is not None else ""
    return f"# {f.model_name} —{bits} {f.method_name.split(' ')[0]} (qdlm)\n"


def _how_made(f: _Facts) -> str:
    if f.base_model and f.base_model == f.source:
        src = f"[{f.source}](https://huggingface.co/{f.source})"
    elif f.base_model:  # a local copy of a Hub model
        src = f"[{f.base_model}](https://huggingface.co/{f.base_model}) (from a local copy, `{f.source}`)"
    else:
        src = f"`{f.source}`" if f.source else "a model"
    family = f.family_name
    kind = f"a {family} diffusion language model" if family else "a diffusion language model"
    parts = [f"This is a quantized version of {src}, {kind}."]

    weights = (
        f"Linear-layer weights are stored as {f.bits}-bit integers"
        if f.bits is not None
        else "Linear-layer weights are quantized"
    )
    if f.group_size in (-1, 0, None):
        weights += " with one scale per output channel" if f.group_size is not None else ""
    else:
        weights += f" in groups of {f.group_size}"
    if f.symmetric is not None:
        weights += ", symmetric (no zero point)" if f.symmetric else ", asymmetric (with zero points)"
    if f.scale_dtype:
        weights += f", {f.scale_dtype} scales"
    parts.append(weights + ".")

    if f.act_bits:
        how = []
        if "dynamic" in f.act:
            how.append("dynamic" if f.act.get("dynamic") else "static")
        if f.act.get("granularity"):
            how.append(f"per-{f.act['granularity']}")
        parts.append(f"Activations are quantized to {f.act_bits}-bit{' (' + ', '.join(how) + ')' if how else ''}.")
    else:
        parts.append("Activations stay in 16-bit (weight-only quantization).")

    parts.append(f"Method: {f.method_name}.")
    calib = _dict(f.report.get("calibration"))
    if f.needs_no_calibration:
        parts.append(f"{f.method_name.split(' ')[0]} needs no calibration data.")
    elif calib:
        bits_ = []
        if calib.get("nsamples") is not None:
            bits_.append(f"{calib['nsamples']} samples")
        if calib.get("seqlen") is not None:
            bits_.append(f"of {calib['seqlen']} tokens")
        ds = f" from the `{public_name(calib['dataset'])}` dataset" if calib.get("dataset") else ""
        parts.append(f"Calibration data: {' '.join(bits_) or 'see qdlm_report.json'}{ds}.")

    transforms = _dict(f.qc.get("transforms"))
    if transforms:
        parts.append(f"Transforms applied before quantization: {', '.join(f'`{k}`' for k in sorted(transforms))}.")
    quantized = f.qc.get("quantized_modules")
    kept = f.qc.get("modules_not_converted")
    if isinstance(quantized, list) and quantized:
        parts.append(f"{len(quantized)} linear layers are quantized.")
    if isinstance(kept, list) and kept:
        shown = ", ".join(f"`{m}`" for m in kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        parts.append(f"Kept in original precision: {shown}.")
    overrides = _dict(f.qc.get("module_overrides"))
    if overrides:
        parts.append(f"{len(overrides)} modules use their own settings (see `module_overrides` in `config.json`).")
    tool = f"[qdlm-export]({PROJECT_URL})" + (f" {f.tool_version}" if f.tool_version else "")
    parts.append(f"Made with {tool}.")

    text = "## How it was made\n\n" + " ".join(parts) + "\n"
    if f.command:
        text += f"\nCommand:\n\n```bash\n{f.command}\n```\n"
    return text


def _how_to_load(f: _Facts, repo_id: str) -> str:
    base = f.qc.get("base_model_type")
    wrapped = bool(f.auto_map) and isinstance(base, str) and f.config.get("model_type") == f"qdlm_{base}"
    if wrapped:  # a transformers-native family under its own model type (loader/native_wrappers.py)
        auto_cls = "AutoModelForCausalLM"
        why = (
            f"`config.json` names the model type `qdlm_{base}` instead of `{base}`, so that transformers without "
            "the qdlm loader refuses this checkpoint instead of loading its quantized layers as random weights. "
        )
    elif f.auto_map:
        auto_cls = "AutoModel"
        arch = f" (`{f.architecture}`)" if f.architecture else ""
        why = (
            f"The model's architecture{arch} is not part of transformers: it is defined by the Python files "
            "shipped in this repository (see `auto_map` in `config.json`). "
        )
    else:
        auto_cls, why = "AutoModelForCausalLM", ""
    remote = bool(f.auto_map)
    extra = ", trust_remote_code=True" if remote else ""
    if remote and f.self_contained:
        install = "```bash\npip install transformers torch\n```\n\n"
        header = ""
        why += (
            "The checkpoint is self-contained: it carries the qdlm loader and kernels as remote code "
            f"(`{SELF_CONTAINED_LOADER}` and its siblings), so it loads with transformers alone; "
            "`trust_remote_code=True` runs those files. Read them before running them."
        )
    else:
        install = "```bash\npip install qdlm-export\n```\n\n"
        header = "import qdlm_export  # teaches transformers the `qdlm` quantization format\n"
        if remote:
            why += ("It loads where qdlm-export is installed (its remote code asks for it); "
                    "`trust_remote_code=True` runs the Python files shipped here. Read them before running them.")
    code = (
        install
        + "```python\n"
        + header
        + f"from transformers import {auto_cls}, AutoTokenizer\n\n"
        f'model = {auto_cls}.from_pretrained("{repo_id}"{extra}, dtype="auto")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{extra})\n'
        "```\n"
    )
    return "## How to load\n\n" + code + (f"\n{why.strip()}\n" if why.strip() else "")


def _sizes(f: _Facts) -> str:
    r = f.report
    rows: list[tuple[str, str, str]] = []

    def add(label: str, orig: float | None, quant: float | None, fmt) -> None:
        if orig is None and quant is None:
            return
        rows.append((label, fmt(orig) if orig is not None else "—", fmt(quant) if quant is not None else "—"))

    lo, lq = _number(r.get("linear_bytes_original")), _number(r.get("linear_bytes_quantized"))
    add("Linear-layer weights", lo, lq, human_bytes)
    add("Whole checkpoint", _number(r.get("source_checkpoint_bytes")), _number(r.get("checkpoint_bytes")), human_bytes)
    params = _number(r.get("linear_params"))
    bpw = _number(r.get("bits_per_weight"))
    bpw_orig = lo * 8 / params if lo is not None and params else None
    add("Bits per linear weight", bpw_orig, bpw, lambda v: f"{v:.2f}".rstrip("0").rstrip("."))
    if not rows:
        return ""
    lines = ["## Size", "", "| | Original | Quantized |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    if params:
        count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
        text += f"\nLinear-layer parameters: {count}. Bits per weight count the scales (and zero points) too.\n"
    return text


def _quality(f: _Facts) -> str:
    r = f.report
    out = []
    err = _number(r.get("relative_output_error"))
    if err is not None:
        out.append(
            f"Relative output error measured by qdlm-export against the original model "
            f"(lower is better): **{err:.4g}**.\n"
        )
    ev = r.get("eval")
    rows = []
    if isinstance(ev, dict):
        for task in sorted(ev):
            v = ev[task]
            if isinstance(v, dict) and ("original" in v or "quantized" in v):
                o, q = _number(v.get("original")), _number(v.get("quantized"))
                delta = f"{q - o:+.4g}" if o is not None and q is not None else "—"
                rows.append(
                    f"| {_cell(str(task))} | {_fmt(v.get('original'))} | {_fmt(v.get('quantized'))} | {delta} |"
                )
    if rows:
        out.append("| Task | Original | Quantized | Δ |\n|---|---:|---:|---:|\n" + "\n".join(rows) + "\n")
        how = _eval_settings_note(_dict(r.get("eval_settings")))
        if how:
            out.append(how)
    return "## Quality\n\n" + "\n".join(out) if out else ""


def _eval_settings_note(s: dict[str, Any]) -> str:
    """One sentence on how the eval table was made (written by ``qdlm-export eval``)."""
    if not s:
        return ""
    bits = []
    if s.get("lm_eval_version"):
        bits.append(f"lm-eval {s['lm_eval_version']}")
    if _number(s.get("mc_num")) is not None:
        bits.append(f"mc_num={_fmt(s['mc_num'])}")
    if _number(s.get("limit")) is not None:
        bits.append(f"at most {_fmt(s['limit'])} examples per task")
    text = "Measured with `qdlm-export eval`" + (f" ({', '.join(bits)})" if bits else "") + "."
    if isinstance(s.get("nll"), dict):
        text += " `masked_token_nll` is the held-out masked-token NLL in nats (lower is better)."
    return text + "\n"


def _format_note(f: _Facts) -> str:
    return (
        "## Format\n\n"
        "Weights are packed in the `qdlm` format"
        + (f" (format version {f.qc['format_version']})" if f.qc.get("format_version") is not None else "")
        + "; `quantization_config` in `config.json` records the scheme, the quantized modules and how "
        f"the checkpoint was made. The layout is described in `{FORMAT_DOC}` in the "
        f"[qdlm-export]({PROJECT_URL}) sources.\n"
    )


# ----------------------------------------------------------------------------------- API
def render_model_card(folder: Path, repo_id: str | None = None, *, license: str | None = None,
                      base_model: str | None = None) -> str:
    """README.md text for the checkpoint in ``folder``.

    ``repo_id`` goes into the loading example (without it, the folder's name). ``license`` and
    ``base_model``: ``None`` finds them from the source (:func:`card_metadata.resolve_inputs`), ``""``
    leaves them out.
    """
    folder = Path(folder)
    config = _read_json(folder / "config.json", required=True)
    report = _read_json(folder / REPORT_FILE, required=False)
    f = _Facts(config, report, self_contained=(folder / SELF_CONTAINED_LOADER).is_file())
    inputs = CardInputs(repo_id=repo_id, license=license, base_model=base_model)
    f.license, f.base_model = resolve_inputs(folder, f.source, inputs)
    where = repo_id or folder.name
    sections = [_title(f), _how_made(f), _how_to_load(f, where), _sizes(f), _quality(f), _format_note(f)]
    return _front_matter(f) + "\n" + "\n".join(s for s in sections if s)


def write_model_card(folder: Path, repo_id: str | None = None, *, license: str | None = None,
                     base_model: str | None = None) -> Path:
    """Write README.md into ``folder`` (replacing any there) and return its path."""
    path = Path(folder) / CARD_FILE
    path.write_text(render_model_card(folder, repo_id, license=license, base_model=base_model), encoding="utf-8")
    return path


def is_generated_card(folder: Path) -> bool:
    """README.md is exactly what qdlm-export renders for the folder's files now, with the inputs the
    card itself shows (its loading target, license, base model): nobody edited it. Independent of
    where the folder lives, its name and its files' times, so a copied checkpoint's card still counts."""
    try:
        text = (Path(folder) / CARD_FILE).read_text(encoding="utf-8")
        inputs = card_inputs(text)
        if inputs.repo_id is None:
            return False
        rendered = render_model_card(folder, inputs.repo_id, license=inputs.license, base_model=inputs.base_model)
    except Exception:  # noqa: BLE001 - unreadable card or config: treat as edited, never overwrite
        return False
    return text == rendered


def regenerated_inputs(folder: Path) -> CardInputs:
    """The inputs to re-render a generated card with: its license and base model, and its repo id
    when it names a Hub repo (a folder name is re-derived, so a copied folder's card names its new name)."""
    try:
        inputs = card_inputs((Path(folder) / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return CardInputs()
    repo_id = inputs.repo_id if looks_like_hub_id(inputs.repo_id) else None
    return CardInputs(repo_id=repo_id, license=inputs.license, base_model=inputs.base_model)
