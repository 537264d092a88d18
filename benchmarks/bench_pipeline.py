"""Peak memory and time per block of the layer-by-layer pipeline at LLaDA-8B block shapes.

Builds LLaDA-architecture models with the real 8B block shapes (d_model 4096, MLP 12288, 32 heads)
but only a few blocks (random bf16 weights), quantizes each in a fresh subprocess, and reports peak
RSS, seconds per block and the process's CPU seconds (the wall clock counts time another job holds
the cores; CPU time does not). Peak memory must not grow with depth; time extrapolates linearly to
the 32 blocks of LLaDA-8B.

    python benchmarks/bench_pipeline.py --method gptq --blocks 2 4 --nsamples 16 --seqlen 512 [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

LLADA_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_heads": 32}


def run_one(model_dir: Path, out_dir: Path, method: str, nsamples: int, seqlen: int, device: str) -> dict:
    """Quantize in a child process so its peak RSS is its own."""
    code = f"""
import json, resource, time
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.quantize.api import make_config, quantize
start = time.perf_counter()
s = quantize({str(model_dir)!r}, {str(out_dir)!r}, make_config({method!r}, bits=4, group_size=128),
             calibration=CalibrationConfig(nsamples={nsamples}, seqlen={seqlen}), trust_remote_code=True,
             verify=False, device={device!r}, batch_size=4)
report = json.load(open({str(out_dir / 'qdlm_report.json')!r}))
# VmHWM is this process's own high-water mark; ru_maxrss would include the parent's (kept across exec).
hwm_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"peak_rss_gb": hwm_kb / 1024**2, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "seconds_per_block": report["seconds_per_block"], "total_s": time.perf_counter() - start}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from qdlm_export.fixtures import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.blocks:
            model = build_tiny_model("llada", Path(tmp) / f"m{n}", num_layers=n, dtype=torch.bfloat16, **LLADA_8B)
            checkpoint_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1024**3
            r = run_one(model, Path(tmp) / f"q{n}", args.method, args.nsamples, args.seqlen, args.device)
            per_block = sorted(r["seconds_per_block"])[len(r["seconds_per_block"]) // 2]  # median
            rows.append({"blocks": n, "checkpoint_gb": round(checkpoint_gb, 2), "peak_rss_gb": round(r["peak_rss_gb"], 2),
                         "median_s_per_block": round(per_block, 1), "total_s": round(r["total_s"], 1),
                         "process_cpu_s": round(r["cpu_s"], 1),
                         "extrapolated_32_blocks_min": round(per_block * 32 / 60, 1)})
    result = {"method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "device": args.device, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.method} W4 g128, {args.nsamples}x{args.seqlen} calibration tokens, {result['machine']}")
    print("blocks  checkpoint GB  peak RSS GB  s/block (median)  extrapolated 32 blocks  process wall / CPU s")
    for r in rows:
        print(f"{r['blocks']:>6}  {r['checkpoint_gb']:>13}  {r['peak_rss_gb']:>11}  {r['median_s_per_block']:>16}  "
              f"{r['extrapolated_32_blocks_min']:>18} min  {r['total_s']:>8} / {r['process_cpu_s']}")


if __name__ == "__main__":
    main()
