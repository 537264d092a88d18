"""Calibration data: text from a corpus, tokenized and cut into fixed-length windows, optionally
masked the way a masked-diffusion model sees its inputs.

Sources: "default" (the corpus shipped in ``assets/corpus``), a .txt file, a .jsonl file, a folder of
.txt/.md/.py/.rst files; and, read with the optional ``datasets`` package
(``calibration_sources.py``), json/csv/tsv/parquet/arrow files, ``save_to_disk`` folders and Hub
dataset ids. Records and rows are joined by a blank line, so the same paragraphs give the same
windows whichever way they arrive (docs/calibration.md).

Files are checked at the door: text must be UTF-8. Binary files (known formats by their first bytes,
anything else by NUL bytes), UTF-16 and other 8-bit encodings, empty files and JSONL lines that are
not JSON objects with the text field are refused naming the file (and line) and the fix; a data file
whose bytes do not match its name is refused naming what it holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..core import progress
from ..core.configs import CalibrationConfig
from ..errors import ConfigError, InputDataError, json_kind
from .block_calibration import BlockDraw, mask_current_blocks
from .calibration_sources import (
    DATA_BUILDERS, ROW_SEPARATOR, UTF16, binary_kind, chat_renderer, conversations, dataset_text,
    is_saved_dataset, load_data_files, load_hub_dataset, load_saved_dataset, not_text_hint,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_CORPUS = ASSETS / "corpus" / "default.txt"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
_TEXT_HINT = "pass UTF-8 text: a .txt file, a .jsonl file with one JSON object per line, or a folder of them"


def _decode_text(data: bytes, name: str) -> str:
    """``data`` (the bytes of calibration text ``name``) as a string, or an error that says what the
    bytes are instead: a known binary format, UTF-16, binary (NUL bytes), or another 8-bit encoding."""
    kind = binary_kind(data)
    if kind is not None:
        raise InputDataError(f"calibration file {name} is not text: it looks like {kind}", hint=not_text_hint(kind))
    for bom, encoding in UTF16:
        if data.startswith(bom):
            raise InputDataError(
                f"calibration file {name} is {encoding} text, not UTF-8",
                hint=f"convert it with: iconv -f {encoding} -t UTF-8 {name} > converted.txt",
            )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputDataError(f"calibration file {name} looks binary (NUL bytes at offset {nul})", hint=_TEXT_HINT)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"calibration file {name} is not UTF-8 (byte 0x{data[exc.start]:02X} at offset {exc.start}); "
            f"it is probably Latin-1/Windows-1252 or another 8-bit encoding",
            hint=f"convert it with iconv, e.g.: iconv -f LATIN1 -t UTF-8 {name} > converted.txt",
        ) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputDataError(
            f"cannot read calibration file {path}: {exc.strerror}", hint="check the path and its permissions"
        ) from None


def read_text_file(path: Path) -> str:
    """The UTF-8 text of one calibration file; empty, binary and non-UTF-8 files are refused."""
    text = _decode_text(_read_bytes(path), str(path))
    if not text.strip():
        raise InputDataError(
            f"calibration file {path} is empty", hint="pass a file with text in it, or --calib default"
        )
    return text


def _jsonl_records(path: Path, expected: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ``expected`` says what an object must hold."""
    data = _read_bytes(path)
    if not data.strip():
        raise InputDataError(
            f"calibration file {path} is empty", hint="pass a file with text in it, or --calib default"
        )
    if b"\x00" in data or binary_kind(data) or any(data.startswith(bom) for bom, _ in UTF16):
        _decode_text(data, str(path))  # binary: raises with the detected type
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise InputDataError(
                f"{where} is not UTF-8 (byte 0x{raw[exc.start]:02X} at column {exc.start + 1})",
                hint=f"convert the file with iconv, e.g.: iconv -f LATIN1 -t UTF-8 {path} > converted.jsonl",
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputDataError(
                f"{where} is not valid JSON ({exc.msg}, column {exc.colno})",
                hint="a .jsonl file holds one JSON object per line, e.g. {\"text\": \"...\"}",
            ) from None
        if not isinstance(record, dict):
            raise InputDataError(
                f"{where} is a JSON {json_kind(record)}, not an object with {expected}",
                hint="a .jsonl file holds one JSON object per line, e.g. {\"text\": \"...\"}",
            )
        records.append((lineno, record))
    return records


def _default_field(records: list[tuple[int, dict]]) -> str:
    """``"text"`` when the first record has it, else its only string field, else ``"text"`` (which
    then fails naming the fields the records have)."""
    if not records or "text" in records[0][1]:
        return "text"
    strings = [k for k, v in records[0][1].items() if isinstance(v, str)]
    return strings[0] if len(strings) == 1 else "text"


def _read_jsonl(path: Path, text_field: str | None, render: Callable[[list], str] | None = None) -> str:
    if render is not None:
        records = _jsonl_records(path, "a conversation")
        rows = [r for _, r in records]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        lines = [n for n, _ in records]
        texts = [render(m) for m in conversations(rows, columns, text_field, str(path), lambda i: f"{path}:{lines[i]}")]
        return ROW_SEPARATOR.join(texts)
    records = _jsonl_records(path, f"a {text_field or 'text'!r} field" if text_field else "a 'text' field")
    text_field = text_field or _default_field(records)
    texts = []
    for lineno, record in records:
        where = f"{path}:{lineno}"
        if text_field not in record:
            fields = ", ".join(map(repr, list(record)[:10])) or "none"
            raise InputDataError(
                f"{where} has no field {text_field!r} (its fields: {fields})",
                hint="set the text field with --calib-field",
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise InputDataError(
                f"{where}: field {text_field!r} is a JSON {json_kind(value)}, not a string",
                hint="the --calib-field field must hold the text of each record",
            )
        texts.append(value)
    text = ROW_SEPARATOR.join(texts)
    if not text.strip():
        raise InputDataError(f"calibration file {path} has no text (no non-empty {text_field!r} records)",
                             hint="pass a file with text in it, or --calib default")
    return text


def _text_folder(path: Path) -> str | None:
    """The text of a folder's .txt/.md/.py/.rst files, joined; None when it has none."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        return None
    # Empty files (an empty __init__.py) are skipped; a binary or non-UTF-8 one is refused.
    texts = [t for t in (_decode_text(_read_bytes(p), str(p)) for p in files) if t.strip()]
    if not texts:
        raise InputDataError(
            f"calibration folder {path} has no usable text: its {len(files)} {'/'.join(TEXT_SUFFIXES)} "
            "file(s) are all empty",
            hint="put UTF-8 text files in it, or pass --calib default",
        )
    return ROW_SEPARATOR.join(texts)


def _source_kind(source: str, path: Path) -> str:
    if source == "default":
        return "default"
    if path.is_dir():
        return "saved dataset" if is_saved_dataset(path) else "folder"
    if path.is_file():
        suffix = path.suffix.lower()
        return "jsonl" if suffix == ".jsonl" else "data file" if suffix in DATA_BUILDERS else "text"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hub"
    raise ConfigError(
        f"calibration source {source!r} is neither a file, a folder nor a Hub dataset id",
        hint="pass --calib default, a .txt/.jsonl/.parquet/.csv/.json/.arrow file, a folder, or a dataset id "
        "like owner/name",
    )


def _check_options(kind: str, source: str, dataset_config: str | None, split: str, chat: bool) -> None:
    """Refuse the dataset options on sources they do not apply to, rather than ignore them."""
    if dataset_config is not None and kind != "hub":
        raise ConfigError(f"--calib-config {dataset_config!r} applies to Hub datasets; {source!r} is not one",
                          hint="leave --calib-config out")
    if split != "train" and kind in ("default", "text", "jsonl"):
        raise ConfigError(f"--calib-split {split!r} applies to datasets; {source!r} is {kind} text",
                          hint="leave --calib-split out")
    if chat and kind in ("default", "text"):
        raise ConfigError(f"--calib-chat-template: {source} is plain text, without conversations to render",
                          hint="pass instruction data (.jsonl, a dataset file or folder, a Hub dataset), "
                          "or drop --calib-chat-template")


def load_text(
    source: str, text_field: str | None = None, *, dataset_config: str | None = None, split: str = "train",
    render: Callable[[list], str] | None = None,
) -> str:
    """All calibration text of ``source`` as one string. Text files must be UTF-8: binary, UTF-16,
    Latin-1 and empty files are refused naming the file (and for .jsonl, the line). ``render``: turn
    each row's conversation into text (the chat template); plain text sources have none."""
    path = Path(source).expanduser()
    kind = _source_kind(source, path)
    _check_options(kind, source, dataset_config, split, render is not None)
    if kind == "default":
        return DEFAULT_CORPUS.read_text(encoding="utf-8")
    if kind == "hub":
        return dataset_text(load_hub_dataset(source, dataset_config, split), source, text_field, render)
    if kind == "saved dataset":
        return dataset_text(load_saved_dataset(path, split, split_given=split != "train"), str(path), text_field, render)
    if kind == "jsonl":
        return _read_jsonl(path, text_field, render)
    if kind == "data file":
        return dataset_text(load_data_files([path], split, str(path)), str(path), text_field, render)
    if kind == "text":
        return read_text_file(path)
    # A folder: its text files; else (or for conversations, or a split) its data files.
    text = _text_folder(path) if render is None and split == "train" else None
    if text is not None:
        return text
    data_files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_BUILDERS)
    if data_files:
        return dataset_text(load_data_files(data_files, split, str(path)), str(path), text_field, render)
    if render is not None or split != "train":
        option = "--calib-chat-template" if render is not None else f"--calib-split {split!r}"
        raise InputDataError(f"calibration folder {path} has no json/csv/tsv/parquet/arrow files, which {option} reads",
                             hint=f"put a dataset's files in it, or leave {option} out")
    raise InputDataError(
        f"calibration folder {path} has no {'/'.join(TEXT_SUFFIXES)} files",
        hint="put UTF-8 text files in it, or pass a .txt/.jsonl file",
    )


def calibration_text(config: CalibrationConfig, tokenizer=None) -> str:
    """The text ``config`` names, with the chat template of ``tokenizer`` applied when it asks."""
    render = chat_renderer(tokenizer) if config.chat_template else None
    return load_text(config.source, config.text_field, dataset_config=config.dataset_config, split=config.split,
                     render=render)


def tokenize_corpus(tokenizer, text: str, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids of a long text, tokenized in paragraph-aligned chunks (tokenizers warn on, and some
    models' tokenizers truncate, very long single inputs)."""
    ids: list[int] = []
    start = 0
    with progress.step("tokenizing calibration text (characters)", len(text)) as tokenized:
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                cut = text.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            ids.extend(tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"])
            tokenized.advance(end - start)
            start = end
    return torch.tensor(ids, dtype=torch.long)


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``: free CUDA memory, or the RAM the kernel
    reports as available (MemAvailable: free plus reclaimable cache); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no driver, or a device index that does not exist: checked elsewhere
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def check_calibration_fits(
    config: CalibrationConfig, adapter, model_config: dict, *, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, available: int | None = None,
) -> None:
    """Refuse, before any work, a ``--seqlen`` beyond the model's maximum context and an
    ``--nsamples``/``--seqlen`` whose captured activations cannot fit in memory.

    The pipeline keeps every calibration sequence's hidden states of the current block on
    ``device`` and computes the next block's beside them: ``2 * nsamples * seqlen * hidden_size``
    elements of ``dtype`` (plus a ``seqlen x seqlen`` attention mask for block-causal or causal
    calibration). ``available`` overrides the measured free memory (tests)."""
    limit = adapter.max_context(model_config)
    if limit is not None and config.seqlen > limit[1]:
        key, value = limit
        raise ConfigError(
            f"--seqlen {config.seqlen} is beyond the model's maximum context of {value} tokens "
            f"(config.json {key})",
            hint=f"use --seqlen {value} or less (512-2048 is typical for calibration)",
        )
    hidden = None
    for key in adapter.hidden_size_keys:
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            hidden = value
            break
    if hidden is None:
        return
    element = torch.empty((), dtype=dtype).element_size()
    need = 2 * config.nsamples * config.seqlen * hidden * element
    if config.resolved_attention(adapter.block_length) != "full":
        need += config.seqlen * config.seqlen * element  # the one attention mask every batch shares
    free = available if available is not None else available_memory(device)
    if free is not None and need > free:
        fits = max(0, free // (2 * config.seqlen * hidden * element))
        where = "GPU memory" if torch.device(device).type == "cuda" else "RAM"
        raise ConfigError(
            f"calibration with --nsamples {config.nsamples} x --seqlen {config.seqlen} needs about {_size(need)} "
            f"for the captured activations (2 x samples x seqlen x hidden size {hidden} x {element} bytes), "
            f"but only {_size(free)} of {where} is available",
            hint=f"use --nsamples {fits} or fewer (128 is typical), or a smaller --seqlen"
            if fits else "use a smaller --seqlen and --nsamples (128 x 512 is typical)",
        )


def calibration_tokens(tokenizer, config: CalibrationConfig, mask_token_id: int | None = None,
                       block_length: int | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows drawn at random offsets of the tokenized corpus.

    With ``config.masking == "random"`` (and ``"auto"`` when the model has a mask token) each sample
    draws a ratio ``t ~ U(0, 1)`` and masks each token with probability ``t`` (LLaDA's forward
    process), so calibration sees what the model sees at denoising steps rather than clean text only.
    With block-causal attention (``config.attention``, ``"auto"`` for a family with ``block_length``)
    the masking follows the block-diffusion sampler instead (``block_calibration.py``).
    """
    return calibration_windows(tokenizer, config, mask_token_id, block_length)[0]


def calibration_windows(tokenizer, config: CalibrationConfig, mask_token_id: int | None = None,
                        block_length: int | None = None) -> tuple[torch.Tensor, list[BlockDraw]]:
    """:func:`calibration_tokens`, with each window's block-diffusion draw (current block, ratio, masked
    count) when the attention is block-causal and tokens are masked; else an empty list."""
    attention = config.resolved_attention(block_length)
    # The windows themselves (int64, plus the masking draws): refuse what cannot be allocated at all,
    # rather than fail inside torch with an allocator error.
    need = config.nsamples * config.seqlen * 8 * (3 if config.masking != "none" else 1)
    free = available_memory("cpu")
    if free is not None and need > free:
        raise ConfigError(
            f"--nsamples {config.nsamples} x --seqlen {config.seqlen} calibration tokens need about {_size(need)}, "
            f"but only {_size(free)} of RAM is available",
            hint="use a smaller --nsamples (128 is typical) or --seqlen",
        )
    ids = tokenize_corpus(tokenizer, calibration_text(config, tokenizer))
    if ids.numel() < config.seqlen + 1:
        raise ConfigError(
            f"calibration text has {ids.numel()} tokens, fewer than --seqlen {config.seqlen}",
            hint="use a larger corpus or a smaller --seqlen",
        )
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seqlen, (config.nsamples,), generator=gen)
    tokens = torch.stack([ids[s : s + config.seqlen] for s in starts.tolist()])
    if config.resolved_masking(mask_token_id) == "random":
        if mask_token_id is None:
            raise ConfigError(
                "--calib-masking random needs a mask token, and this model has none",
                hint="use --calib-masking none (or auto, which picks none for models without a mask token)",
            )
        if attention == "block-causal":
            return mask_current_blocks(tokens, block_length, mask_token_id, gen)
        ratio = torch.rand(config.nsamples, 1, generator=gen)
        masked = torch.rand(tokens.shape, generator=gen) < ratio
        tokens = torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
    return tokens, []
