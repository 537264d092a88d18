"""Per-block output error of a quantized checkpoint against its source, on the same inputs.

For every decoder block ``i`` the source model's own input to that block is captured, and both the
full-precision block and the quantized block are run on it: ``err_i = ||q_i(x_i) - f_i(x_i)||^2 /
||f_i(x_i)||^2``. This isolates each block's quantization error from error propagated from earlier
blocks, which is how methods are compared block by block (GPTQ/AWQ vs RTN). Both models are held in
memory: meant for small models, tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..families import family_for_config


def _load(folder: Path, auto_class: str, trust_remote_code: bool) -> nn.Module:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cls = getattr(transformers, auto_class)
    return cls.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=torch.float32).eval()


@torch.no_grad()
def block_output_errors(
    source: str | Path, quantized: str | Path, tokens: torch.Tensor, *, trust_remote_code: bool = True
) -> list[float]:
    fp = _load(Path(source), family_for_config(fp_config := _config(source)).auto_class, trust_remote_code)
    adapter = family_for_config(fp_config)
    q = _load(Path(quantized), adapter.auto_class, trust_remote_code)
    fp_blocks, q_blocks = adapter.block_list(fp), adapter.block_list(q)
    calls: list[list[tuple]] = [[] for _ in fp_blocks]

    def capture(index):
        def hook(module, args, kwargs):
            calls[index].append((args, kwargs))

        return hook

    handles = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(fp_blocks)]
    try:
        fp(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    errors = []
    for i, (fb, qb) in enumerate(zip(fp_blocks, q_blocks)):
        num = den = 0.0
        for args, kwargs in calls[i]:
            ref, got = _first(fb(*args, **kwargs)), _first(qb(*args, **kwargs))
            num += (got - ref).double().pow(2).sum().item()
            den += ref.double().pow(2).sum().item()
        errors.append(num / den)
    return errors


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _config(folder: str | Path) -> dict:
    import json

    return json.loads((Path(folder) / "config.json").read_text())
