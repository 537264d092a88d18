"""Fixtures shared by the export tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """A tiny dense Qwen2 (a family transformers loads natively), saved with the shipped tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qdlm_export.fixtures import tokenizer_dir

    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    for f in tokenizer_dir().iterdir():
        shutil.copy(f, out / f.name)
    return out
