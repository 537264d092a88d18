"""Blocks compute in the compute dtype, whatever the checkpoint stores: a bf16 checkpoint quantized on
a CPU (float32 by default) is materialised in float32 with exactly the stored values."""

from __future__ import annotations

import torch
from safetensors import safe_open

import qdlm_export  # noqa: F401
from qdlm_export.fixtures import build_tiny_model
from qdlm_export.quantize.source import SourceModel


def test_a_bf16_checkpoint_materialises_in_the_compute_dtype(tmp_path):
    folder = build_tiny_model("llada", tmp_path / "bf16", dtype=torch.bfloat16)
    source = SourceModel.open(str(folder), trust_remote_code=True)
    model = source.skeleton()
    block = f"{source.adapter.block_prefix(0)}"
    source.materialize(model, block, torch.device("cpu"), torch.float32)
    params = {n: p for n, p in model.named_parameters() if n.startswith(block + ".")}
    assert params and all(p.dtype == torch.float32 for p in params.values())
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as stored:
        for name, param in params.items():
            want = stored.get_tensor(name)
            assert want.dtype == torch.bfloat16
            assert torch.equal(param.detach(), want.float()), name
