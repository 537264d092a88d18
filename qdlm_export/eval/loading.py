"""Loading an original or a quantized checkpoint, and its tokenizer, for evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _dtype(value: Any) -> Any:
    if value in (None, "auto") or isinstance(value, torch.dtype):
        return value
    try:
        return getattr(torch, str(value).removeprefix("torch."))
    except AttributeError:
        raise ValueError(f"unknown dtype {value!r}") from None


def auto_class_name(config: Any) -> str:
    """The transformers Auto class that loads a model of ``config``'s family with its head."""
    from ..families import family_for_config

    return family_for_config(config).auto_class


def load_model(
    pretrained: str | Path, *, dtype: Any = "auto", device: str | torch.device = "cpu", trust_remote_code: bool = True
) -> torch.nn.Module:
    """Load an original or a quantized (qdlm) checkpoint with the Auto class its family uses.

    LLaDA and Dream are defined by the Python files in their folders, so ``trust_remote_code``
    defaults to True here: evaluate only checkpoints whose code you have reviewed."""
    import transformers  # the qdlm quantization format is registered by importing this package

    config_path = Path(pretrained) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    else:
        config = transformers.AutoConfig.from_pretrained(str(pretrained), trust_remote_code=trust_remote_code)
    auto_class = auto_class_name(config)
    auto = getattr(transformers, auto_class)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    auto_map = (config.get("auto_map") if isinstance(config, dict) else getattr(config, "auto_map", None)) or {}
    if not (trust_remote_code and auto_map):
        model = auto.from_pretrained(str(pretrained), **kwargs)
        return model.to(device).eval()
    # The model's own code (an original LLaDA/Dream as published, written for transformers 4): the
    # known incompatibilities are repaired in memory first (families/compat.py), as `quantize` does,
    # and a failure inside that code is reported as the model's, not as a bug of this tool.
    from ..quantize.fidelity import prepare_folder_code

    try:
        prepare_folder_code(str(pretrained), auto_class, auto_map=auto_map)
        model = auto.from_pretrained(str(pretrained), **kwargs)
    except Exception as exc:
        _raise_if_model_code(exc, pretrained, config if isinstance(config, dict) else {}, "loading it for evaluation")
        raise
    return model.to(device).eval()


def _raise_if_model_code(exc: BaseException, pretrained: str | Path, config: dict, stage: str) -> None:
    """Raise preflight's UnsupportedModelError when ``exc`` comes from the model's own Python files."""
    from types import SimpleNamespace

    from ..errors import QdlmError
    from ..quantize.preflight import _model_frame, remote_code_error

    if isinstance(exc, QdlmError):  # already in words (a damaged checkpoint's CheckpointError): not the code's
        return
    source = SimpleNamespace(model_id=str(pretrained), path=Path(pretrained), config_dict=config)
    if _model_frame(exc, source) is not None:
        raise remote_code_error(source, exc, stage, other_code="--original with a model whose code supports "
                                "transformers 5") from None


def load_tokenizer(pretrained: str | Path, *, trust_remote_code: bool = False):
    """The checkpoint's tokenizer; for a quantized folder without one, its source model's. A tokenizer
    that ships its own code runs it only with ``trust_remote_code`` (the commands check first)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(pretrained), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as first:
        from ..errors import CheckpointError
        from .checkpoint_files import original_of

        try:  # the source model, found the way `eval` finds it (provenance keeps only a folder name)
            source = original_of(pretrained) if (Path(pretrained) / "config.json").is_file() else None
        except CheckpointError:
            source = None
        if not source:
            raise first
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
