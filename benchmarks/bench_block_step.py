"""One denoising step of a LLaDA-8B-shaped block, quantized several ways, against the same block dense.

Builds a 1-block LLaDA with the real 8B block shapes (d_model 4096, MLP 12288, 32 heads; random
bf16 weights), quantizes it with each scheme below (no calibration-heavy methods: the point is the
kernels, not the weights), and times a full forward pass of each against the original with
``qdlm_export.bench.model.run_model_benchmark`` (same run, same tokens; the original in each dense
dtype, the fastest is the baseline; ``--repeat`` interleaved repetitions, ratio median with its
min-max spread). For QuaRot the share of the step spent
in online Hadamard transforms is measured too (each call timed between device synchronisations, so
it is an upper bound).

    python benchmarks/bench_block_step.py --device cuda --batch 4 --seqlen 1024 --json

Schemes: ``rtn-w4g128`` (weight-only), ``rtn-wa-w8a8`` (integer path), ``quarot-w4a4`` (RTN weights,
online Hadamards, integer path).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

LLADA_8B = dict(hidden_size=4096, intermediate_size=12288, num_heads=32)
SCHEMES = {
    "rtn-w4g128": ("rtn", dict(bits=4, group_size=128)),
    "rtn-wa-w8a8": ("rtn-wa", dict(bits=8, act_bits=8)),
    "quarot-w4a4": ("quarot", dict(bits=4, act_bits=4, weight_method="rtn", w_clip=False)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda [default: cuda when available]")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=10, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the timings (default 1)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--small", action="store_true", help="hidden 256 instead of 4096 (a smoke test)")
    args = parser.parse_args(argv)

    import torch

    from qdlm_export.bench.model import run_model_benchmark
    from qdlm_export.core.configs import CalibrationConfig
    from qdlm_export.fixtures import build_tiny_model
    from qdlm_export.quantize.api import make_config, quantize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = dict(hidden_size=256, intermediate_size=768, num_heads=4) if args.small else LLADA_8B
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("llada", Path(tmp) / "block", num_layers=1, dtype=torch.bfloat16, **shapes)
        for name in args.schemes:
            method, options = SCHEMES[name]
            out = Path(tmp) / name
            t0 = time.perf_counter()
            quantize(
                str(model),
                out,
                make_config(method, **options),
                calibration=CalibrationConfig(nsamples=4, seqlen=128),
                trust_remote_code=True,
                verify=False,
                device=device,
            )
            quant_s = time.perf_counter() - t0
            r = run_model_benchmark(
                out, batch=args.batch, seqlen=args.seqlen, repeat=args.repeat, device=device, trust_remote_code=True,
                threads=args.threads,
            )
            r.pop("checkpoint", None)
            rows.append({"scheme": name, "quantize_s": round(quant_s, 2), **r})
            print(
                f"{name}: ratio {r['ratio']} [{r['ratio_low']}-{r['ratio_high']}] vs {r['dense_dtype']} "
                f"(speedup {r['speedup']}x), hadamard share {r['hadamard_share']}",
                file=sys.stderr,
            )
    result = {
        "shapes": shapes,
        "blocks": 1,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "device": device,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(json.dumps(result, indent=2) if args.json else "\n".join(json.dumps(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
