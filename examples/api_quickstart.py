"""The Python API in one script (docs/API.md): quantize the tiny LLaDA embedded in the package with
GPTQ, inspect the checkpoint, load it with ``from_pretrained``, run it, and dequantize it.

    python examples/api_quickstart.py [OUT_FOLDER] [--verify]

Offline and CPU-only; a few seconds without --verify.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel

import qdlm_export  # registers the "qdlm" quantization method with transformers
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.format.validation import inspect_checkpoint
from qdlm_export.methods.gptq import GPTQConfig
from qdlm_export.quantize.api import make_config, quantize

EMBEDDED = Path(qdlm_export.__file__).parent / "assets" / "tiny-llada"


def main(argv: list[str]) -> None:
    verify = "--verify" in argv
    args = [a for a in argv if a != "--verify"]
    out = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="qdlm-api-")) / "tiny-llada-gptq-w4"

    # A method config: by name with make_config, or the method's class directly (the same thing).
    config = make_config("gptq", bits=4, group_size=64, damp=0.01)
    assert config == GPTQConfig(bits=4, group_size=64, damp=0.01)
    # Calibration: the shipped corpus here; a .txt/.jsonl/.parquet file, a save_to_disk folder or a
    # Hub dataset id work the same way (docs/calibration.md).
    calibration = CalibrationConfig(source="default", nsamples=16, seqlen=64, seed=0)

    summary = quantize(
        str(EMBEDDED), out, config, calibration=calibration,
        trust_remote_code=True,  # the embedded model's own code (LLaDA) ships with the package
        device="cpu", verify=verify, overwrite=True,
    )
    print(f"wrote {summary.out}: {summary.quantized_modules} linears at {summary.bits_per_weight:.2f} bits/weight")
    if summary.relative_output_error is not None:
        print(f"relative output error vs the original: {summary.relative_output_error:.4f}")

    info = inspect_checkpoint(out, device="cpu")
    print(f"inspect: method={info.method} bits={info.bits} group_size={info.group_size} "
          f"checkpoint={info.checkpoint_bytes} bytes")

    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    print(f"logits {tuple(logits.shape)}")

    dense = model.dequantize()  # weight-only checkpoints: plain nn.Linear layers again
    with torch.no_grad():
        again = dense(input_ids=tokens).logits
    print(f"dequantized model: max |logit difference| {(again - logits).abs().max().item():.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
