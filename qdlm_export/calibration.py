"""Calibration data: text from a corpus, tokenized and cut into fixed-length windows, optionally
masked the way a masked-diffusion model sees its inputs.

Sources: "default" (the corpus shipped in ``assets/corpus``), a .txt file, a .jsonl file (field
``text``), a folder of .txt/.md/.py files, or a Hub dataset name (only where ``datasets`` is
installed and the Hub is reachable).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .configs import CalibrationConfig
from .errors import ConfigError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_CORPUS = ASSETS / "corpus" / "default.txt"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


def load_text(source: str, text_field: str = "text") -> str:
    """All calibration text of ``source`` as one string."""
    if source == "default":
        return DEFAULT_CORPUS.read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"calibration folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}:{lineno} is not valid JSON") from None
                if text_field not in record:
                    raise ConfigError(
                        f"{path}:{lineno} has no field {text_field!r}", hint="set the text field with --calib-field"
                    )
                texts.append(str(record[text_field]))
            return "\n\n".join(texts)
        return path.read_text(encoding="utf-8", errors="replace")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return _load_hub_dataset(source, text_field)
    raise ConfigError(
        f"calibration source {source!r} is neither a file, a folder nor a Hub dataset id",
        hint="pass --calib default, a .txt/.jsonl file, a folder of text files, or a dataset id like owner/name",
    )


def _load_hub_dataset(name: str, text_field: str) -> str:
    try:
        import datasets  # type: ignore
    except ImportError:
        raise ConfigError(
            f"calibration dataset {name} needs the `datasets` package", hint="pip install datasets, or pass a local file"
        ) from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise ConfigError(
            f"could not load calibration dataset {name} ({type(exc).__name__})",
            hint="check the name and your connection, or pass a local text/jsonl file",
        ) from None
    if text_field not in ds.column_names:
        raise ConfigError(f"dataset {name} has no column {text_field!r}", hint=f"columns: {ds.column_names}")
    return "\n\n".join(ds[text_field][:20000])


def tokenize_corpus(tokenizer, text: str, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids of a long text, tokenized in paragraph-aligned chunks (tokenizers warn on, and some
    models' tokenizers truncate, very long single inputs)."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        ids.extend(tokenizer(text[start:end], add_special_tokens=False, verbose=False)["input_ids"])
        start = end
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer, config: CalibrationConfig, mask_token_id: int | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows drawn at random offsets of the tokenized corpus.

    With ``config.masking == "random"`` (and ``"auto"`` when the model has a mask token) each sample
    draws a ratio ``t ~ U(0, 1)`` and masks each token with probability ``t`` (LLaDA's forward
    process), so calibration sees what the model sees at denoising steps rather than clean text only.
    """
    text = load_text(config.source, config.text_field)
    ids = tokenize_corpus(tokenizer, text)
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
            raise ConfigError("--calib-masking random needs a mask token, and this model has none")
        ratio = torch.rand(config.nsamples, 1, generator=gen)
        masked = torch.rand(tokens.shape, generator=gen) < ratio
        tokens = torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
    return tokens
