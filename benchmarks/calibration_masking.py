"""Clean vs dLLM-masked calibration, measured: masked-token NLL of quantized trained models.

For each shipped trained model (tiny-llada, tiny-dream), each calibrating method (GPTQ, AWQ) and
bit width, quantize twice — calibration on clean text (`--calib-masking none`, what the study did)
and on text masked with a per-sample ratio t ~ U(0,1) (`random`, what a dLLM sees while denoising) —
and score the held-out masked-token NLL (qdlm_export.eval.likelihood) of each against the original.
Calibration uses only the training part of the shipped corpus; the score only its held-out tail.

    python benchmarks/calibration_masking.py [--out docs/calibration.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "qdlm_export" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args()

    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.eval.likelihood import corpus_split, heldout_tokens, masked_token_nll
    from qdlm_export.quantize.api import make_config, quantize

    hf_logging.disable_progress_bar()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_text = Path(tmp) / "train.txt"
        train_text.write_text(corpus_split()[0])
        for family in ("llada", "dream"):
            src = ASSETS / f"tiny-{family}"
            if not (src / "model.safetensors").exists():
                print(f"skip {family}: {src} missing")
                continue
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=True)
            held = heldout_tokens(tok, args.windows, args.seqlen, seed=0)
            original = AutoModel.from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
            base = masked_token_nll(original, held)
            for method in ("gptq", "awq"):
                for bits in (4, 3, 2):
                    nll = {}
                    for masking in ("none", "random"):
                        out = Path(tmp) / f"{family}-{method}-{bits}-{masking}"
                        calib = CalibrationConfig(source=str(train_text), nsamples=args.nsamples, seqlen=args.seqlen,
                                                  seed=0, masking=masking)
                        quantize(str(src), out, make_config(method, bits=bits, group_size=128), calibration=calib,
                                 trust_remote_code=True, verify=False)
                        model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
                        nll[masking] = masked_token_nll(model, held)
                    rows.append((family, method, bits, base, nll["none"], nll["random"]))
                    print(rows[-1], flush=True)

    lines = [
        "# Calibration: clean text vs dLLM-masked text",
        "",
        "Held-out masked-token NLL (nats, lower is better; mean over masking ratios 0.15-0.9) of the",
        "shipped trained models, quantized with calibration on clean text (`--calib-masking none`) or on",
        "text masked with a per-sample ratio t ~ U(0, 1) (`--calib-masking random`). Calibration:",
        f"{args.nsamples} x {args.seqlen} tokens of the corpus' training part; score: {args.windows} x",
        f"{args.seqlen} tokens of its held-out tail. Group size 128.",
        "",
        "| model | method | bits | original | clean calib | masked calib | Δ clean | Δ masked |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    wins = 0
    for family, method, bits, base, clean, masked in rows:
        wins += masked < clean
        lines.append(f"| tiny-{family} | {method} | {bits} | {base:.4f} | {clean:.4f} | {masked:.4f} | "
                     f"{clean - base:+.4f} | {masked - base:+.4f} |")
    lines += [
        "",
        f"Masked calibration gives the lower NLL in {wins} of {len(rows)} settings.",
        "",
        "**Decision: masked calibration is the default** (`--calib-masking auto`: `random` for every model with a mask token). At W4 and W3 these models lose so little",
        "that both choices sit within a few thousandths of a nat of the original; at W2, where the",
        "calibration data matters, masked calibration cuts the NLL increase several-fold for both methods",
        "and both families. A dLLM's linears see mask-token embeddings at every denoising step, and",
        "calibrating on clean text alone never shows the quantizer those inputs. `--calib-masking none`",
        "reproduces the study's clean-text calibration.",
        "",
        f"Command: `python benchmarks/calibration_masking.py --out docs/calibration.md` "
        f"({time.time() - started:.0f} s on {platform.machine()}, {torch.get_num_threads()} threads, CPU).",
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        # The measured study is the document's first part; hand-written sections after it are kept.
        out = Path(args.out)
        kept = ""
        if out.is_file():
            old = out.read_text()
            marker = old.find("\n## Calibration data sources")
            kept = old[marker:] if marker >= 0 else ""
        out.write_text(text + kept)
    print(text)


if __name__ == "__main__":
    main()
