"""Fidelity of a written checkpoint: reload it with ``from_pretrained`` and compare its logits to the
source model's on a few calibration batches.

The reference forward streams the source block by block (hooks materialise each block's weights
just before it runs and release them after), so verifying a large model needs no second full copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .source import SourceModel


@torch.no_grad()
def reference_logits(source: SourceModel, tokens: torch.Tensor, device: torch.device, batch_size: int = 4) -> torch.Tensor:
    model = source.skeleton()
    adapter = source.adapter
    for prefix in source.non_block_prefixes(model):
        source.materialize(model, prefix, device, torch.float32)
    handles = []
    for index, block in enumerate(adapter.block_list(model)):
        prefix = adapter.block_prefix(index)

        def load(module: nn.Module, args, prefix=prefix):
            source.materialize(model, prefix, device, torch.float32)

        def free(module: nn.Module, args, output, prefix=prefix):
            source.release(model, prefix)

        handles += [block.register_forward_pre_hook(load), block.register_forward_hook(free)]
    try:
        return _logits(model, tokens, device, batch_size)
    finally:
        for h in handles:
            h.remove()


def _logits(model: nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    outs = []
    for start in range(0, tokens.shape[0], batch_size):
        out = model(input_ids=tokens[start : start + batch_size].to(device))
        logits = out.logits if hasattr(out, "logits") else out[0]
        outs.append(logits.float().cpu())
    return torch.cat(outs)


def load_quantized(folder: Path, auto_class: str, trust_remote_code: bool, device: torch.device) -> nn.Module:
    import transformers

    from transformers.utils import logging as hf_logging

    cls = getattr(transformers, auto_class)
    hf_logging.disable_progress_bar()  # our own progress is on screen; theirs would interleave
    try:
        model = cls.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    return model.to(device).eval()


@torch.no_grad()
def relative_output_error(
    source: SourceModel, folder: Path, tokens: torch.Tensor, device: torch.device
) -> float:
    """``||logits_q - logits_ref||_F / ||logits_ref||_F`` over ``tokens``."""
    ref = reference_logits(source, tokens, device)
    model = load_quantized(folder, source.adapter.auto_class, source.trust_remote_code, device)
    got = _logits(model, tokens, device, batch_size=4)
    del model
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))
