"""Tile configurations of the Triton GEMMs on this GPU: each candidate timed beside the dense matmul.

    python benchmarks/triton_sweep.py [--ops weight_only int8 w4a4] [--m 16 256 1024 4096] [--json]

For each op, shape ``K x N`` and token count ``M``: the heuristic's own pick (``pick_config`` /
``_gemm_config``) and a few candidate tile sizes (for weight-only also torch's int4 tensor-core
kernel and the one-pass dequantization followed by cuBLAS), the torch fallback, and dense ``x @ W.T`` in bfloat16, all on the same weights
and inputs. Times are medians of ``triton.testing.do_bench_cudagraph``
(GPU time: the launch overhead of eager Python is left out) and, for the heuristic and dense,
also eager ``do_bench``. Every candidate's output is checked against the torch backend's (relative
error); a candidate that does not compile (shared memory, say) is reported with its error.

CUDA (gpu_check.sh runs it); results decide the heuristic tables in the kernel modules. ``--smoke``
runs it on the CPU in Triton's interpreter (TRITON_INTERPRET=1), on tiny shapes, untimed: a test.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K[, SWAP_AB[, OFFSET_CODES]]]) per M class.
# SWAP_AB (the dequantized weight as the MMA's first operand) and OFFSET_CODES (codes as exact floats
# base + q, zero point and scale on the accumulator) are new since the H200 run of 2026-12-04. Every
# candidate compiles for sm_90 within its shared memory (tests/kernels/test_triton_gpu_compile.py).
WO = {
    "small": [(16, 32, 128, 4, 3), (16, 64, 128, 4, 4), (16, 32, 128, 4, 3, 4), (16, 64, 128, 4, 3, 4),
              (16, 32, 128, 4, 3, 8), (16, 64, 128, 4, 4, 1, True), (16, 128, 128, 4, 4, 1, True),
              (16, 64, 128, 4, 3, 4, True), (16, 32, 128, 4, 3, 1, False, True), (16, 64, 128, 4, 4, 1, True, True),
              (16, 64, 128, 4, 3, 4, True, True)],
    "mid": [(64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 128, 4, 3, 1, True),
            (128, 128, 64, 8, 3, 1, True), (64, 128, 128, 4, 3, 1, False, True), (64, 128, 128, 4, 3, 1, True, True)],
    "large": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3, 1, True),
              (128, 256, 64, 8, 3, 1, True), (128, 128, 128, 8, 3, 1, False, True),
              (128, 128, 128, 8, 3, 1, True, True), (128, 256, 64, 8, 3, 1, True, True),
              (256, 128, 64, 8, 3, 1, False, True)],
}
INT8 = {
    "small": [(16, 64, 128, 4, 3), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 32, 256, 4, 4)],
    "mid": [(64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (64, 64, 128, 4, 4), (128, 128, 64, 8, 3)],
    "large": [(128, 128, 64, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3),
              (128, 256, 64, 8, 4)],
}
SHAPES = ((4096, 4096), (4096, 12288), (12288, 4096))


class TerminatedEarly(BaseException):
    """SIGTERM arrived (the caller's time limit): stop and print what was measured. Not an Exception:
    the per-candidate handlers, which record a candidate's failure and go on, must not catch it."""


def _terminated(signum, frame) -> None:
    raise TerminatedEarly()


def m_class(m: int) -> str:
    return "small" if m <= 16 else "mid" if m <= 256 else "large"


def as_config(c: tuple) -> dict:
    cfg = dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], num_warps=c[3], num_stages=c[4], GROUP_M=8)
    if len(c) > 5:
        cfg["SPLIT_K"] = c[5]
    if len(c) > 6:
        cfg["SWAP_AB"] = c[6]
    if len(c) > 7:
        cfg["OFFSET_CODES"] = c[7]
    return cfg


# what a tuned table may hold: a candidate within this relative error of the torch backend's output
# (bf16 rounding differences are ~1e-3; a wrong kernel is off by O(1))
TABLE_MAX_REL_ERR = 0.02
# the sweep's other strategies, by the registry name of the backend that runs them
OTHER_BACKENDS = {"dequant+cuBLAS": "triton_dequant", "tinygemm": "cuda_tinygemm"}


def table_entries(rows: list[dict]) -> list[dict]:
    """Per measured (op, K, N, M): the fastest candidate whose output is right, as a tuned-table entry.
    The int8 row's quantize+GEMM (activation quantization included) is not an alternative GEMM."""
    entries = []
    for row in rows:
        ok = [c for c in row["candidates"] if "graph_ms" in c and c["name"] != "quantize+GEMM"
              and c.get("rel_err_vs_torch", 1.0) <= TABLE_MAX_REL_ERR]
        if not ok:
            continue
        best = min(ok, key=lambda c: c["graph_ms"])
        heuristic = next((c for c in ok if c["name"] == "heuristic"), None)
        backend = OTHER_BACKENDS.get(best["name"], "triton")
        entries.append(dict(op=row["op"], K=row["K"], N=row["N"], M=row["M"], backend=backend,
                            config=best["config"] if backend == "triton" else None, vs_dense=best.get("vs_dense"),
                            vs_heuristic=round(heuristic["graph_ms"] / best["graph_ms"], 3) if heuristic else None))
    return entries


def write_table(where: str, result: dict) -> str:
    """Merge this run's entries into the device's table (entries of problems not measured now stay);
    returns the path written."""
    import datetime

    import triton

    from qdlm_export.kernels import tuned

    path = tuned.TABLE_DIR / tuned.table_name(result["device"]) if where == "auto" else Path(where)
    fresh = table_entries(result["rows"])
    measured = {(e["op"], e["K"], e["N"], e["M"]) for e in fresh}
    try:
        old = [e for e in json.loads(path.read_text())["entries"] if (e["op"], e["K"], e["N"], e["M"]) not in measured]
    except (OSError, ValueError, KeyError, TypeError):
        old = []
    table = dict(device=result["device"], measured=datetime.date.today().isoformat(), torch=result["torch"],
                 triton=triton.__version__, source="benchmarks/triton_sweep.py (CUDA-graph GPU time, median)",
                 entries=sorted(old + fresh, key=lambda e: (e["op"], e["K"], e["N"], e["M"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".partial")
    staged.write_text(json.dumps(table, indent=1) + "\n")
    staged.replace(path)
    print(f"tuned table: {len(fresh)} entries measured now, {len(table['entries'])} in {path}", file=sys.stderr)
    return str(path)


def rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=["weight_only", "int8", "w4a4"],
                        choices=["weight_only", "int8", "w4a4"])
    parser.add_argument("--m", nargs="+", type=int, default=[16, 256, 1024, 4096])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES])
    parser.add_argument("--rep", type=int, default=25, help="do_bench rep (ms)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new shape/M after this many seconds (the result says it was cut short)")
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, 256x128 and M 3/40: a test")
    parser.add_argument("--table", nargs="?", const="auto", default=None, metavar="PATH",
                        help="write the fastest correct choice per op, shape and M as this GPU model's tuned table "
                             "(kernels/tuned.py), merged into PATH; bare --table: this tree's qdlm_export/kernels/tuned/")
    args = parser.parse_args(argv)
    if args.smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
        args.shapes, args.m = ["256x128"], [3, 40]

    import torch
    import triton.testing as tt

    from qdlm_export.bench.kernels import quantized_weights
    from qdlm_export.kernels import int8 as int8_torch
    from qdlm_export.kernels import int8_triton, weight_only, weight_only_dequant_triton, weight_only_triton

    if not torch.cuda.is_available() and not args.smoke:
        print("triton_sweep.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.smoke else "cuda")
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()

    def once_ms(fn) -> float:  # --smoke: one call, wall clock (the interpreter's time means nothing)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def graph_ms(fn) -> float:
        return once_ms(fn) if args.smoke else float(tt.do_bench_cudagraph(fn, rep=args.rep, return_mode="median"))

    def eager_ms(fn) -> float:
        return once_ms(fn) if args.smoke else float(tt.do_bench(fn, warmup=5, rep=args.rep, return_mode="median"))

    rows = []
    cut_short = False
    longest_step = 0.0
    # gpu_check.sh runs this under `timeout`: on SIGTERM, print what was measured (the JSON is
    # printed once, at the end) instead of dying with it
    signal.signal(signal.SIGTERM, _terminated)
    try:
        for shape in args.shapes:
            if cut_short:
                break
            k, n = (int(v) for v in shape.split("x"))
            w32 = torch.randn(n, k, generator=gen) * 0.02
            w16 = w32.to(dev, torch.bfloat16)
            q = quantized_weights(w32, 4, 128, dev)
            wp, ws = q["weight_only"]
            w8p, w8s = q["w8a8"]  # packed symmetric 8-bit codes, as a W8A8 checkpoint holds them
            w4p, w4s = q["w4a4"]
            for m in args.m:
                # stop before a step that would not end within the budget (the longest so far as its guess)
                if args.budget_s is not None and time.perf_counter() - started + longest_step > args.budget_s:
                    cut_short = True
                    print(f"time budget of {args.budget_s:.0f} s spent: stopping before {k}x{n} M={m}", file=sys.stderr)
                    break
                step_started = time.perf_counter()
                x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
                dense = lambda: x @ w16.T  # noqa: E731
                base = dict(K=k, N=n, M=m, dense_graph_ms=round(graph_ms(dense), 5), dense_eager_ms=round(eager_ms(dense), 5))
                xq, xs = int8_triton.quantize_per_token_triton(x, 8)
                x4q, x4s = int8_triton.quantize_per_token_triton(x, 4)
                cases = {}
                if "weight_only" in args.ops:
                    ref = weight_only.weight_only_linear_torch(x, wp, ws, None, 4, 128, k)
                    cases["weight_only"] = (
                        ref,
                        lambda cfg: (lambda: weight_only_triton.weight_only_linear_triton(x, wp, ws, None, 4, 128, k, config=cfg)),
                        lambda: weight_only.weight_only_linear_torch(x, wp, ws, None, 4, 128, k),
                        WO[m_class(m)],
                        weight_only_triton.pick_config(m, n, 128, k),
                        {"dequant+cuBLAS": lambda: weight_only_dequant_triton.weight_only_linear_triton_dequant(
                            x, wp, ws, None, 4, 128, k),
                         # torch's int4 tensor-core kernel (CUDA only: the smoke run leaves it out)
                         **({} if args.smoke else {"tinygemm": lambda: weight_only.weight_only_linear(
                             x, wp, ws, None, 4, 128, k, backend="cuda_tinygemm")})},
                    )
                def packed_int_case(*gemm_args, others):
                    """A packed_int_linear case: the same arguments for the reference, the candidates and torch."""
                    return (int8_torch.packed_int_linear_torch(*gemm_args),
                            lambda cfg: (lambda: int8_triton.packed_int_linear_triton(*gemm_args, config=cfg)),
                            lambda: int8_torch.packed_int_linear_torch(*gemm_args),
                            INT8[m_class(m)], int8_triton._gemm_config(m, n), others)

                if "int8" in args.ops:
                    # the int8 GEMM on the checkpoint's 8-bit codes (packed_int_linear routes them to it)
                    cases["int8"] = packed_int_case(
                        xq, xs, w8p, w8s, None, 8, -1, k, None, torch.bfloat16,
                        # what a W8A8 linear runs: the activation quantization, then the GEMM (heuristic tiles)
                        others={"quantize+GEMM": lambda: int8_triton.packed_int_linear_triton(
                            *int8_triton.quantize_per_token_triton(x, 8), w8p, w8s, None, 8, -1, k, None, torch.bfloat16)},
                    )
                if "w4a4" in args.ops:
                    cases["w4a4"] = packed_int_case(x4q, x4s, w4p, w4s, None, 4, -1, k, None, torch.bfloat16, others={})
                for op, (ref, make, torch_fn, candidates, heuristic, others) in cases.items():
                    row = dict(op=op, **base, torch_graph_ms=None, candidates=[])
                    try:
                        row["torch_graph_ms"] = round(graph_ms(torch_fn), 5)
                    except Exception as exc:  # noqa: BLE001 - reported
                        row["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    configs = [("heuristic", dict(heuristic))] + [(str(c), as_config(c)) for c in candidates]
                    configs += [(name, None) for name in others]  # other strategies, timed the same way
                    for name, cfg in configs:
                        entry = dict(name=name, config={kk: v for kk, v in (cfg or {}).items() if kk != "GROUP_M"})
                        try:
                            fn = make(cfg) if cfg is not None else others[name]
                            entry["rel_err_vs_torch"] = round(rel_err(fn(), ref), 6)
                            entry["graph_ms"] = round(graph_ms(fn), 5)
                            if name == "heuristic":
                                entry["eager_ms"] = round(eager_ms(fn), 5)
                            entry["vs_dense"] = round(base["dense_graph_ms"] / entry["graph_ms"], 3)
                        except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result too
                            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                        row["candidates"].append(entry)
                    timed = [c for c in row["candidates"] if "graph_ms" in c]
                    if timed:
                        best = min(timed, key=lambda c: c["graph_ms"])
                        row["best"] = best["name"]
                        row["best_vs_dense"] = best["vs_dense"]
                    rows.append(row)
                    print(f"{op:12s} {k}x{n} M={m}: dense {base['dense_graph_ms']:.4f} ms (eager {base['dense_eager_ms']:.4f}); "
                          f"best {row.get('best')} {row.get('best_vs_dense')}x dense; heuristic "
                          f"{next((c.get('vs_dense') for c in row['candidates'] if c['name'] == 'heuristic'), None)}x",
                          file=sys.stderr)
                longest_step = max(longest_step, time.perf_counter() - step_started)
    except TerminatedEarly:
        cut_short = True
        print("terminated: printing the rows measured so far", file=sys.stderr)
    result = dict(device="cpu (interpreter smoke run)" if args.smoke else torch.cuda.get_device_name(dev), torch=torch.__version__,
                  seconds=round(time.perf_counter() - started, 1), cut_short=cut_short, rows=rows)
    if args.table:
        result["table"] = write_table(args.table, result)
    print(json.dumps(result, indent=1) if args.json else "\n".join(json.dumps(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
