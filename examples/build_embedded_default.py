"""Regenerate qdlm_export/assets/tiny-llada/, the checkpoint qdlm-export uses when given no model.

It is a small LLaDA (2 layers, d_model 256, 4 heads, MLP 768, the shipped 2048-token tokenizer)
trained with the masked-diffusion objective on the shipped corpus by examples/train_tiny_dllm.py,
stored in bfloat16 like the public LLaDA-8B; ``--all`` also retrains qdlm_export/assets/tiny-dream/.
Each model takes 10-20 minutes on 2 CPU threads (more on a busy machine); the training settings are
train_tiny_dllm.py's defaults, and each folder's training.json records the run.

    python examples/build_embedded_default.py          # tiny-llada only
    python examples/build_embedded_default.py --all    # tiny-llada, then tiny-dream
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "train_tiny_dllm.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also retrain tiny-dream")
    args = parser.parse_args()
    for family in ("llada", "dream") if args.all else ("llada",):
        subprocess.run([sys.executable, str(SCRIPT), "--family", family], check=True)


if __name__ == "__main__":
    main()
