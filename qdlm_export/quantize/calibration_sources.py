"""Calibration sources beyond plain text: what kind of file a path holds (by its first bytes), and
tabular data read through the optional ``datasets`` package (``pip install "qdlm-export[calib]"``).

Tabular sources are local json/csv/tsv/parquet/arrow files (``load_dataset(<builder>, data_files=...)``),
``save_to_disk`` folders (``load_from_disk``) and Hub dataset ids (``load_dataset(id, config,
split=...)``). Their rows become one text the way a .jsonl file's records do: the text column's
values, in order, joined by :data:`ROW_SEPARATOR`; with the chat template on, each row is a
conversation rendered by the model's tokenizer first (docs/calibration.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, InputDataError, json_kind

# Rows (and .jsonl records, and the files of a text folder) are joined by a blank line, so a dataset
# and a .txt file holding the same paragraphs give the same calibration windows.
ROW_SEPARATOR = "\n\n"
# Rows read from a tabular source at most (pick others with --calib-split "train[1000:5000]").
MAX_ROWS = 20_000
DATA_BUILDERS = {".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
INSTALL_HINT = 'install it with: pip install "qdlm-export[calib]"'

# Leading bytes of the binary formats a calibration path most often points at by mistake.
MAGIC = (
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"PK\x03\x04", "a zip archive (or .docx/.xlsx/.odt, which are zip files)"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"(\xb5/\xfd", "a zstd archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x7fELF", "an ELF executable"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"PAR1", "a Parquet file"),
    (b"ARROW1", "an Arrow file"),
    (b"\xff\xff\xff\xff", "an Arrow stream (a datasets cache or save_to_disk file)"),
    (b"\x80\x02", "a Python pickle"),
    (b"\x80\x03", "a Python pickle"),
    (b"\x80\x04", "a Python pickle"),
    (b"\x80\x05", "a Python pickle"),
)
UTF16 = ((b"\xff\xfe", "UTF-16LE"), (b"\xfe\xff", "UTF-16BE"))
# Where a known binary kind has a reader, the hint says how to use it.
_RENAME = {"a Parquet file": ".parquet", "an Arrow file": ".arrow",
           "an Arrow stream (a datasets cache or save_to_disk file)": ".arrow"}

# Instruction data, for --calib-chat-template: a conversation column, else a prompt and a response.
CONVERSATION_COLUMNS = ("messages", "conversations")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "query")
RESPONSE_COLUMNS = ("response", "completion", "output", "answer")


def binary_kind(data: bytes) -> str | None:
    """What ``data``'s first bytes say it is, for the binary formats in :data:`MAGIC`; else None."""
    for magic, kind in MAGIC:
        if data.startswith(magic):
            return kind
    return None


def not_text_hint(kind: str) -> str:
    suffix = _RENAME.get(kind)
    if suffix:
        return f"name the file *{suffix} to read it as a dataset (needs `datasets`), or pass UTF-8 text"
    return "pass UTF-8 text (.txt, .jsonl, a folder of them) or a json/csv/parquet/arrow dataset file"


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _datasets(what: str):
    try:
        import datasets  # type: ignore
    except ImportError:
        raise ConfigError(f"{what} is read with the `datasets` package, which is not installed",
                          hint=INSTALL_HINT) from None
    return datasets


def _reason(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def check_data_file(path: Path) -> str:
    """The ``datasets`` builder for a json/csv/tsv/parquet/arrow file whose bytes match its name;
    a file whose first bytes say otherwise is refused naming what it is."""
    builder = DATA_BUILDERS[path.suffix.lower()]
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise InputDataError(f"cannot read calibration file {path}: {exc.strerror}",
                             hint="check the path and its permissions") from None
    if not head.strip():
        raise InputDataError(f"calibration file {path} is empty", hint="pass a file with data in it")
    kind = binary_kind(head)
    expected = {"parquet": ("a Parquet file",),
                "arrow": ("an Arrow file", "an Arrow stream (a datasets cache or save_to_disk file)")}.get(builder)
    if expected is not None:
        if kind not in expected:
            found = kind or ("text" if b"\x00" not in head else "binary data of an unknown format")
            raise InputDataError(f"calibration file {path} is named {path.suffix} but holds {found}",
                                 hint=not_text_hint(kind) if kind else "rename it after what it holds")
        return builder
    for bom, encoding in UTF16:
        if head.startswith(bom):
            raise InputDataError(f"calibration file {path} is {encoding} text, not UTF-8",
                                 hint=f"convert it with: iconv -f {encoding} -t UTF-8 {path} > converted{path.suffix}")
    if kind is not None or b"\x00" in head:
        raise InputDataError(f"calibration file {path} is not {builder.upper()} text: it looks like "
                             f"{kind or 'binary data (NUL bytes)'}", hint=not_text_hint(kind or ""))
    return builder


def load_data_files(files: list[Path], split: str, where: str):
    """A ``datasets.Dataset`` of local json/csv/parquet/arrow files (all of one builder)."""
    builders = {check_data_file(f) for f in files}
    if len(builders) > 1:
        raise InputDataError(f"calibration folder {where} mixes {', '.join(sorted(builders))} files",
                             hint="put files of one format in it")
    datasets = _datasets(f"calibration data {where}")
    builder = builders.pop()
    extra = {"delimiter": "\t"} if all(f.suffix.lower() == ".tsv" for f in files) else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split=split, **extra)
    except Exception as exc:
        raise InputDataError(f"calibration data {where} could not be read as {builder} ({_reason(exc)})",
                             hint=f"check that it is valid {builder}, and --calib-split {split!r}") from None


def load_saved_dataset(folder: Path, split: str, split_given: bool):
    """The dataset of a ``save_to_disk`` folder; ``split`` picks one of a ``DatasetDict``'s splits."""
    datasets = _datasets(f"calibration dataset folder {folder}")
    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise InputDataError(f"calibration dataset folder {folder} could not be read ({_reason(exc)})",
                             hint="pass a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ConfigError(f"calibration dataset folder {folder} has no split {split!r}",
                              hint=f"choose one with --calib-split: {', '.join(data)}")
        return data[split]
    if split_given:
        raise ConfigError(f"--calib-split {split!r}: calibration dataset folder {folder} holds a single dataset, "
                          "not a DatasetDict of splits", hint="leave --calib-split out")
    return data


def load_hub_dataset(name: str, config: str | None, split: str):
    datasets = _datasets(f"calibration dataset {name}")
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise ConfigError(
            f"could not load calibration dataset {name}" + (f" (config {config!r})" if config else "")
            + f", split {split!r} ({_reason(exc)})",
            hint="check the id, --calib-config and --calib-split, and your connection (HF_HUB_OFFLINE=1 uses the "
            "cache only); or pass a local file",
        ) from None


def _string_columns(features: dict[str, Any]) -> list[str]:
    return [name for name, feature in features.items()
            if getattr(feature, "dtype", None) in ("string", "large_string")]


def choose_text_column(columns: list[str], string_columns: list[str], field: str | None, where: str) -> str:
    """``field``, else ``"text"``, else the only string column; otherwise an error listing the columns."""
    listed = ", ".join(repr(c) + ("" if c in string_columns else " (not text)") for c in columns) or "none"
    if field is not None:
        if field not in columns:
            raise InputDataError(f"{where} has no column {field!r} (its columns: {listed})",
                                 hint="name the text column with --calib-field")
        return field
    if "text" in columns:
        return "text"
    if len(string_columns) == 1:
        return string_columns[0]
    chat = any(c in columns for c in CONVERSATION_COLUMNS + PROMPT_COLUMNS)
    raise InputDataError(
        f"{where} has no 'text' column and {'several' if string_columns else 'no'} string columns "
        f"(its columns: {listed})",
        hint="name the text column with --calib-field" + (
            ", or render the conversations with --calib-chat-template" if chat else ""),
    )


def dataset_text(data, where: str, field: str | None, render: Callable[[list], str] | None) -> str:
    """The calibration text of a ``datasets.Dataset``: the first :data:`MAX_ROWS` rows' text column
    (or rendered conversations), joined by :data:`ROW_SEPARATOR`."""
    if len(data) > MAX_ROWS:
        data = data.select(range(MAX_ROWS))
    columns = list(data.column_names)
    if render is not None:
        rows = data.to_list()
        texts = [render(m) for m in conversations(rows, columns, field, where, lambda i: f"{where} row {i}")]
    else:
        column = choose_text_column(columns, _string_columns(dict(data.features)), field, where)
        texts = data[column]
        for i, value in enumerate(texts):
            if not isinstance(value, str):
                raise InputDataError(
                    f"{where} row {i}: column {column!r} is {'null' if value is None else json_kind(value)}, "
                    "not a string", hint="name a text column with --calib-field, or drop the rows without text")
    text = ROW_SEPARATOR.join(texts)
    if not text.strip():
        raise InputDataError(f"calibration data {where} has no text", hint="pass a dataset with text in it")
    return text


def conversations(rows: list[dict], columns: list[str], field: str | None, name: str,
                  where: Callable[[int], str]) -> list[list[dict]]:
    """Each row as a list of ``{"role", "content"}`` messages (the rule in docs/calibration.md):
    ``field`` or a ``messages``/``conversations`` column as it is (``where(i)`` names row ``i``); else a prompt column (prompt,
    instruction, question, query; an alpaca ``input`` is appended to the instruction) and a response
    column (response, completion, output, answer), after a ``system`` column's message if present."""
    column = field or next((c for c in CONVERSATION_COLUMNS if c in columns), None)
    if field is not None and field not in columns:
        raise InputDataError(f"{name} has no column {field!r} (its columns: {columns})",
                             hint="name the conversation column with --calib-field")
    if column is not None:
        result = []
        for i, row in enumerate(rows):
            messages = row.get(column)
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise InputDataError(f"{where(i)}: column {column!r} is not a list of {{role, content}} messages",
                                     hint="--calib-chat-template needs conversations: [{\"role\": ..., \"content\": ...}]")
            result.append([{"role": m["role"], "content": m["content"]} for m in messages])
        return result
    prompt = next((c for c in PROMPT_COLUMNS if c in columns), None)
    response = next((c for c in RESPONSE_COLUMNS if c in columns), None)
    if prompt is None or response is None:
        raise InputDataError(
            f"{name} has no conversations for --calib-chat-template (its columns: {columns})",
            hint=f"give it a {' or '.join(CONVERSATION_COLUMNS)} column, or a prompt column ({', '.join(PROMPT_COLUMNS)}) "
            f"and a response column ({', '.join(RESPONSE_COLUMNS)}); or drop --calib-chat-template",
        )
    result = []
    for i, row in enumerate(rows):
        values = {c: row.get(c) for c in (prompt, response, "system", "input") if c in columns}
        for c in (prompt, response):
            if not isinstance(values[c], str):
                raise InputDataError(f"{where(i)}: column {c!r} is {json_kind(values[c])}, not a string",
                                     hint="drop the rows without text")
        user = values[prompt]
        if prompt == "instruction" and isinstance(values.get("input"), str) and values["input"].strip():
            user = user + ROW_SEPARATOR + values["input"]
        messages = [{"role": "system", "content": values["system"]}] if isinstance(values.get("system"), str) else []
        result.append(messages + [{"role": "user", "content": user}, {"role": "assistant", "content": values[response]}])
    return result


def chat_renderer(tokenizer) -> Callable[[list], str]:
    """Messages -> the text the model's chat template makes of them; refused without a template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--calib-chat-template: the model's tokenizer has no chat template",
                          hint="drop --calib-chat-template (and name the text column with --calib-field)")

    def render(messages: list) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    return render
