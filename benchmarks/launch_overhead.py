"""Host time per call of the GPU ops: the Python around each Triton launch, which a small GEMM waits on.

At 16 tokens an H200 computes a 4096 x 4096 weight-only layer in a few microseconds of GPU time, so an
eagerly run layer takes as long as its host work: our launcher's Python, Triton's launch, torch's
allocation. Two modes:

* ``--stubbed`` (the default without CUDA): Triton's ``JITFunction.run`` is replaced by a counter, so
  nothing compiles or runs and the time is ours alone (the registry's choice, the launcher's checks and
  plan lookup, the output allocation, building the launch arguments). Triton's own launch path is not
  in it (about 11 us a launch on a recent host, tritonbench #1002).
* native (CUDA): the ops run for real at a tiny shape (``--m``/``--k``/``--n``, default 1 x 256 x 256,
  microseconds of GPU time), back to back, the GPU synchronised around each block of calls, beside
  ``F.linear`` in bf16: per-call time, which there is host time, and dense / ours.

Statistic: the median and the minimum over ``--blocks`` blocks of ``--calls`` calls.

    python benchmarks/launch_overhead.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _stub_triton_launches() -> list[int]:
    """Replace Triton's launch path by a counter (kernels defined compiled, never run); returns the count."""
    os.environ.pop("TRITON_INTERPRET", None)  # kernels are defined when their modules are imported
    from triton.runtime.jit import JITFunction

    from qdlm_export.kernels import int8_triton, weight_only_triton  # noqa: F401 - define the kernels now

    launches = [0]

    def counted(fn, *args, grid, warmup, **kwargs):
        launches[0] += 1

    JITFunction.run = counted
    # the registry admits Triton on CPU tensors only in interpreter mode; nothing is interpreted here
    os.environ["TRITON_INTERPRET"] = "1"
    return launches


def _per_call_us(fn, device, calls: int, blocks: int) -> dict:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(max(calls // 10, 10)):
        fn()
    times = []
    for _ in range(blocks):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return {"median_us": round(statistics.median(times), 2), "min_us": round(min(times), 2)}


def _quantize_then(x, packed, scale, bits: int, k: int):
    """What a loaded weight-activation checkpoint runs: per-token quantization, then the packed GEMM."""
    from qdlm_export import kernels as K

    x_q, x_scale = K.quantize_per_token(x, bits, backend="triton")
    return K.packed_int_linear(x_q, x_scale, packed, scale, None, bits, -1, k, None, x.dtype, backend="triton")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stubbed", action="store_true", help="never launch (the default without CUDA)")
    parser.add_argument("--m", type=int, default=None, help="tokens [default: 16 stubbed, 1 native]")
    parser.add_argument("--k", type=int, default=None, help="input features [default: 4096 stubbed, 256 native]")
    parser.add_argument("--n", type=int, default=None, help="output features [default: as --k]")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    stubbed = args.stubbed or not torch.cuda.is_available()
    launches = _stub_triton_launches() if stubbed else None
    import torch.nn.functional as F

    from qdlm_export import kernels as K
    from qdlm_export.core.packing import pack_rows

    device = torch.device("cpu" if stubbed else "cuda")
    m = args.m or (16 if stubbed else 1)
    k = args.k or (4096 if stubbed else 256)
    n = args.n or k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    w4 = pack_rows(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8), 4).to(device)
    w8 = pack_rows(torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8), 8).to(device)
    s_g128 = (torch.rand(n, k // 128, generator=gen) * 0.01).to(device, torch.bfloat16)
    s_channel = (torch.rand(n, 1, generator=gen) * 0.01).to(device)
    dense = torch.randn(n, k, generator=gen).to(device, torch.bfloat16)

    ops = {
        "weight_only_w4g128": lambda: K.weight_only_linear(x, w4, s_g128, None, 4, 128, k, backend="triton"),
        "w8a8": lambda: _quantize_then(x, w8, s_channel, 8, k),
        "w4a4": lambda: _quantize_then(x, w4, s_channel, 4, k),
    }
    if not stubbed:
        ops = {"dense_bf16": lambda: F.linear(x, dense), **ops}
    rows = {}
    for name, fn in ops.items():
        before = launches[0] if launches else 0
        rows[name] = _per_call_us(fn, device, args.calls, args.blocks)
        if launches is not None:
            done = args.calls * args.blocks + max(args.calls // 10, 10)
            rows[name]["launches_per_call"] = round((launches[0] - before) / done, 2)
    if "dense_bf16" in rows:
        for name, row in rows.items():
            row["dense_over_ours"] = round(rows["dense_bf16"]["median_us"] / row["median_us"], 3)
    result = {"mode": "stubbed" if stubbed else "native", "device": torch.cuda.get_device_name(0) if not stubbed else "cpu",
              "shape": {"M": m, "K": k, "N": n}, "ops": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"host time per call ({result['mode']}, {m} x {k} -> {n}, median [min] of {args.blocks} x {args.calls}):")
        for name, row in rows.items():
            extra = f"  dense/ours {row['dense_over_ours']:.2f}x" if "dense_over_ours" in row else ""
            print(f"  {name:20s} {row['median_us']:7.2f} us  [{row['min_us']:.2f}]{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
