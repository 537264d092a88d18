"""Regenerate qdlm_export/assets/tiny-llada/, the checkpoint qdlm-export uses when given no model.

A 2-layer LLaDA (hidden 256, 4 heads, MLP 768, the shipped 2048-token tokenizer) with random
weights, seed 0, stored in bfloat16 like the public LLaDA-8B. It lets ``qdlm-export`` and the
examples run end to end offline in seconds; it is not a language model.

    python examples/build_embedded_default.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qdlm_export.fixtures import build_tiny_model

OUT = Path(__file__).resolve().parents[1] / "qdlm_export" / "assets" / "tiny-llada"

CARD = """\
# tiny-llada

The embedded default checkpoint of qdlm-export: a 2-layer LLaDA (d_model 256, 4 heads, MLP 768,
vocab 2048) laid out exactly like `GSAI-ML/LLaDA-8B-Base` (same config keys, remote code and
tensor names), with **random weights** (seed 0, bfloat16). It exists so that quantization, export
and reload can be exercised offline in seconds; its outputs are meaningless.

Load it with `AutoModel.from_pretrained(path, trust_remote_code=True)`.
Regenerate it with `python examples/build_embedded_default.py`.
"""


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    build_tiny_model("llada", OUT, seed=0, hidden_size=256, intermediate_size=768, num_layers=2,
                     num_heads=4, dtype=torch.bfloat16)
    (OUT / "README.md").write_text(CARD, encoding="utf-8")
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
