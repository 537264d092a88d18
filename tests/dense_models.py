"""Tiny dense transformers models for tests: one decoder layer with calibration inputs (block-level
method tests), and whole causal LMs saved with the shipped tokenizer (end-to-end sources)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qdlm_export.fixtures import tokenizer_dir

# Residual-stream channels of the calibration inputs scaled up, and by how much: the few huge
# channels of real LLM activations, which AWQ and GPTQ must handle better than RTN.
OUTLIER_CHANNELS = [3, 77, 150, 201]
OUTLIER_SCALES = [20.0, 35.0, 50.0, 25.0]


def decoder_block(kind: str, seed: int = 0, batches: int = 8):
    """(config, layer, calibration): a transformers decoder layer, hidden 256 (llama: MHA with q/k/v
    biases; qwen2: GQA with 2 kv heads), random biases and norm gains, and ``batches`` random
    1 x 128 inputs with outlier channels and their rotary position embeddings."""
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from qdlm_export.methods.base import BlockCalibration

    torch.manual_seed(seed)
    shape = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_hidden_layers=1, vocab_size=64)
    if kind == "llama":
        config = LlamaConfig(num_key_value_heads=4, attention_bias=True, **shape)
        layer_cls, rotary_cls = LlamaDecoderLayer, LlamaRotaryEmbedding
    elif kind == "qwen2":
        config = Qwen2Config(num_key_value_heads=2, **shape)
        layer_cls, rotary_cls = Qwen2DecoderLayer, Qwen2RotaryEmbedding
    else:
        raise ValueError(f"unknown decoder block kind {kind!r}: llama or qwen2")
    config._attn_implementation = "sdpa"
    block = layer_cls(config, layer_idx=0).eval()
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
            elif not isinstance(module, torch.nn.Linear) and getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)  # norms
    rotary = rotary_cls(config)
    g = torch.Generator().manual_seed(seed + 1)
    hidden, kwargs = [], []
    for _ in range(batches):
        h = torch.randn(1, 128, 256, generator=g)
        h[..., OUTLIER_CHANNELS] *= torch.tensor(OUTLIER_SCALES)
        pos = torch.arange(128).unsqueeze(0)
        hidden.append(h)
        kwargs.append({"attention_mask": None, "position_ids": pos, "position_embeddings": rotary(h, pos)})
    return config, block, BlockCalibration(hidden=hidden, call_kwargs=kwargs)


def save_causal_lm(folder: Path, model_cls, config, *, seed: int) -> Path:
    """``model_cls(config)`` with weights drawn after ``torch.manual_seed(seed)``, saved to ``folder``
    with the shipped tokenizer: a source that quantize() reads like a downloaded checkpoint."""
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    for f in tokenizer_dir().iterdir():
        shutil.copy(f, Path(folder) / f.name)
    return Path(folder)
