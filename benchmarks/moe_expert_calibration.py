"""Routed vs all-tokens calibration of the experts of mixture-of-experts layers, measured.

For the tiny LLaDA2 (``llada2_moe``, non-zero router biases) and LLaDA-MoE (``lladamoe``) stand-ins of
the published code (qdlm_export/fixtures/published/; random weights: no trained tiny MoE exists), each
calibrating method (GPTQ, AWQ), W3 and W4 (group 32), and a small and a larger calibration set,
quantize with

* ``routed``: an expert's statistics from the tokens the router sent it (experts with none: all-tokens),
* ``all-tokens``: every expert's statistics from every token reaching the MoE block,
* ``routed, min N``: routed, but experts with fewer than N routed tokens use the all-tokens statistics,

each block quantized in memory by the method as the pipeline drives it (calibration inputs propagated
through the quantized blocks; the format and the writer play no part), and score the held-out
per-block output error: the sum over layers of the relative error of each
quantized layer's output against the float layer's on the same float input (float64 reference,
tests/families/test_moe_models.py), on held-out masked text (seed 12345). Lower is better.

    python benchmarks/moe_expert_calibration.py [--min-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `tests` package: the float64 measure

CALIBRATIONS = ((4, 64), (32, 128))  # (nsamples, seqlen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-tokens", type=int, default=64, help="the threshold of the third column")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.fixtures import MASK_ID, build_tiny_model, build_tiny_moe_model, tokenizer_dir
    from qdlm_export.quantize.calibration import calibration_tokens
    from tests.families.test_moe_models import block_errors

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    held_out = calibration_tokens(tokenizer, CalibrationConfig(nsamples=8, seqlen=64, seed=12345, masking="random"),
                                  MASK_ID)
    modes = {"routed": {}, "all-tokens": {"expert_calibration": "all-tokens"},
             f"routed, min {args.min_tokens}": {"min_expert_tokens": args.min_tokens}}
    rows, wins = [], {mode: 0 for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"llada2_moe": build_tiny_moe_model("llada2_moe", root / "llada2_moe", router_bias=True),
                  "lladamoe": build_tiny_model("lladamoe", root / "lladamoe", published=True)}
        for family, source in models.items():
            for method in ("gptq", "awq"):
                for bits in args.bits:
                    for nsamples, seqlen in CALIBRATIONS:
                        errors, fallbacks = {}, {}
                        tokens = calibration_tokens(tokenizer, CalibrationConfig(
                            nsamples=nsamples, seqlen=seqlen, seed=0, masking="random"), MASK_ID)
                        for mode, options in modes.items():
                            tensors, fallen = quantize_in_memory(source, family, method, tokens,
                                                                 bits=bits, group_size=32, **options)
                            errors[mode] = block_errors(source, tensors, held_out, family)
                            fallbacks[mode] = len(fallen)
                        best = min(errors, key=errors.get)
                        wins[best] += 1
                        cells = " | ".join(f"**{errors[m]:.4f}**" if m == best else f"{errors[m]:.4f}" for m in modes)
                        rows.append(f"| {family} | {method} | W{bits} | {nsamples}×{seqlen} | {cells} | "
                                    f"{fallbacks[f'routed, min {args.min_tokens}']} |")
                        print(rows[-1], flush=True)
    header = " | ".join(modes)
    print()
    print(f"| family | method | bits | calibration | {header} | linears below min |")
    print("|---|---|---|---|" + "---|" * len(modes) + "---|")
    print("\n".join(rows))
    print()
    print("best per setting: " + ", ".join(f"{mode} {n}" for mode, n in wins.items()))
    print(f"torch {torch.__version__}, {time.time() - started:.0f} s")


def quantize_in_memory(source: Path, family: str, method: str, tokens: torch.Tensor, **options):
    """Every block of ``source`` quantized by ``method`` as the pipeline drives it; returns the model's
    tensors afterwards (dequantized linears, folded norms) and the method's calibration fallbacks."""
    from qdlm_export.families import family_by_name
    from qdlm_export.methods import build_method, make_config
    from qdlm_export.quantize.pipeline import capture_block_inputs
    from tests.families.test_moe_models import _load

    model = _load(source, family)
    adapter = family_by_name(family)
    blocks = adapter.block_list(model)
    quant = build_method(make_config(method, **options), adapter, model.config)
    with torch.no_grad():
        calib = capture_block_inputs(model, blocks, tokens, 4, torch.device("cpu"))
        for index, block in enumerate(blocks):
            quant.quantize_block(block, adapter.block_prefix(index), calib)
            calib.hidden = calib.run(block)
    return dict(model.state_dict()), quant.calibration_fallbacks


if __name__ == "__main__":
    main()
