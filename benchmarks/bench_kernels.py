"""Kernel micro-benchmarks at diffusion-LLM GEMM shapes (see qdlm_export/bench/kernels.py).

    python benchmarks/bench_kernels.py            # CPU: the quick subset (< 1 min); CUDA: the full grid
    python benchmarks/bench_kernels.py --full     # every shape, M in {16, 256, 1024, 4096}
    python benchmarks/bench_kernels.py --json     # the result dict as JSON on stdout
    python benchmarks/bench_kernels.py --peers    # torchao's int4 / int8 linears beside ours

Reports time ratios against the fastest dense matmul (CPU: float32 or bfloat16; CUDA: bfloat16 or
float16) measured in the same interleaved repetitions, as median with min-max spread, and peak
memory. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdlm_export.bench.kernels import OPS, format_report, run_kernel_benchmarks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None, help="M in {16, 256}, two shapes (CPU default)")
    size.add_argument("--full", action="store_true", help="the full grid (CUDA default)")
    p.add_argument("--json", action="store_true", help="print the result dict as JSON")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--bits", type=int, default=4, help="weight-only bits (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="weight-only group size (default 128, -1 per channel)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--m", default=None, help="comma-separated token counts, e.g. 16,256")
    p.add_argument("--repeat", type=int, default=None, help="interleaved repetitions (default 5; median and spread)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the timings (default 1)")
    p.add_argument("--peers", action="store_true", help="also time torchao's int4 weight-only and int8 dynamic paths")
    args = p.parse_args(argv)
    quick = True if args.quick else (False if args.full else None)
    result = run_kernel_benchmarks(
        quick=quick,
        device=args.device,
        bits=args.bits,
        group_size=args.group_size,
        ops=tuple(o for o in args.ops.split(",") if o),
        m_values=tuple(int(v) for v in args.m.split(",")) if args.m else None,
        repeat=args.repeat,
        threads=args.threads,
        peers=args.peers,
        progress=None if args.json else (lambda line: print(line, file=sys.stderr)),
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
