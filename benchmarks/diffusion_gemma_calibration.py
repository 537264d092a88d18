"""Denoising-path calibration for DiffusionGemma, measured against encoder-only calibration.

On the tiny DiffusionGemma (transformers' native ``diffusion_gemma``, qdlm_export/fixtures/diffusion_gemma.py;
*random weights*: no trained tiny DiffusionGemma exists), GPTQ and AWQ (group 64, every linear and every
expert quantized) calibrate on windows of the shipped corpus with

* ``denoising`` (the default, ``--calib-attention auto``): each window a clean context through the causal
  encoder and a noised canvas (uniformly random tokens at drawn levels, self-conditioning stand-in)
  through the decoder reading the encoder's cache, walked layer pair by layer pair;
* ``encoder`` (``--calib-attention causal``): whole clean windows through the causal encoder only, what
  GPTQModel does for this model.

Held-out error: the relative error of the decoder's canvas logits against the original's on noised
windows of other text (``denoising_error``), both models run through their own forward. Several fixture
seeds (the model) and calibration seeds; the full quantize stage runs, as a user runs it (``quantize()``).

    python benchmarks/diffusion_gemma_calibration.py [--models 2] [--seeds 2] [--nsamples 32] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import torch
import transformers

import qdlm_export  # noqa: F401
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.fixtures.diffusion_gemma import build_tiny_diffusion_gemma
from qdlm_export.quantize.api import make_config, quantize
from qdlm_export.quantize.calibration import calibration_tokens
from qdlm_export.quantize.denoising_calibration import denoising_error, denoising_windows

PATHS = {"denoising": "denoising", "encoder": "causal"}


def _load(folder: Path):
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=2, help="fixture seeds")
    parser.add_argument("--seeds", type=int, default=2, help="calibration seeds per model")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    rows: dict[tuple[str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for model_seed in range(args.models):
            source = build_tiny_diffusion_gemma(root / f"src{model_seed}", seed=100 + model_seed)
            original = _load(source)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            heldout = calibration_tokens(tokenizer, CalibrationConfig(nsamples=16, seqlen=args.seqlen, seed=10_000))
            windows = denoising_windows(heldout, original.config, seed=7)
            for bits in args.bits:
                out = root / f"rtn-{model_seed}-{bits}"
                quantize(str(source), out, make_config("rtn", bits=bits, group_size=64), verify=False, device="cpu")
                rows.setdefault(("rtn", bits, "-"), []).append(denoising_error(_load(out), original, windows,
                                                                                batch_size=4))
                for method in args.methods:
                    for path, attention in PATHS.items():
                        for seed in range(args.seeds):
                            out = root / f"{method}-{model_seed}-{bits}-{path}-{seed}"
                            calibration = CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                                                            attention=attention)
                            quantize(str(source), out, make_config(method, bits=bits, group_size=64),
                                     calibration=calibration, verify=False, device="cpu")
                            error = denoising_error(_load(out), original, windows, batch_size=4)
                            rows.setdefault((method, bits, path), []).append(error)
                            print(f"model {model_seed} {method} W{bits} {path} seed {seed}: {error:.4f}", flush=True)
    print("\n| method | bits | calibration | held-out denoising error (mean ± sd over models x seeds) |")
    print("|---|---|---|---|")
    for (method, bits, path), values in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {method} | W{bits} | {path} | {statistics.mean(values):.4f} ± {sd:.4f} |")


if __name__ == "__main__":
    main()
