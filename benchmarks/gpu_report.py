"""Turn the outputs of benchmarks/gpu_check.sh into a machine-named markdown section.

    python benchmarks/gpu_report.py --bench OUT/bench.json [--pipeline OUT/pipeline.json]
        [--steps OUT/steps.json] [--tests OUT/kernel_tests.xml] [--meta OUT/meta.json]
        [--doc docs/benchmarks.md] [--section-out OUT/gpu_section.md]

Inputs (each optional except --bench; a missing or unreadable one is reported as "not measured"):

* ``--bench``: ``qdlm-export bench --full --json`` (``{"kernels": ..., "step": ...}``) or the kernels
  dict alone (``bench.run_kernel_benchmarks``).
* ``--pipeline``: ``benchmarks/bench_pipeline.py --json`` (GPTQ on a LLaDA-8B-shaped model).
* ``--steps``: ``benchmarks/bench_block_step.py --json`` (denoising step of an 8B-shaped block).
* ``--tests``: the JUnit XML of the kernel tests.
* ``--meta``: ``{"gpu": ..., "date": ..., "driver": ..., "steps": {name: status}}`` from the script.

The section starts with ``## GPU check: <device> (<date>)`` and is delimited by HTML comments naming
the device, so running again on the same device replaces its section and another device adds one.
Targets (issue 16, item 6) and whether each held are computed from the numbers, never typed in:

* W8A8 >= 1.6x the bf16 matmul at every shape with M >= 1024;
* W4A16 (weight-only W4 g128) >= 2.5x at M <= 16 and >= 0.9x at M = 1024;
* online Hadamard <= 5 % of a denoising step of a QuaRot W4A4 block.

Speed-up = dense time / quantized time (above 1 is faster), each op's fastest backend per shape.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TARGETS = (
    # (key, op, text, predicate on M, minimum speed-up)
    ("w8a8_large_m", "w8a8", "W8A8 ≥ 1.6× bf16 at M ≥ 1024", lambda m: m >= 1024, 1.6),
    ("w4a16_small_m", "weight_only", "W4A16 ≥ 2.5× bf16 at M ≤ 16", lambda m: m <= 16, 2.5),
    ("w4a16_m1024", "weight_only", "W4A16 ≥ 0.9× bf16 at M = 1024", lambda m: m == 1024, 0.9),
)
# What of the tile sweep (GPU time, CUDA graphs) stands for a target's op: every weight-only
# candidate; for W8A8 only the entry that times the activation quantization with the GEMM.
SWEEP_OP = {"w8a8": ("int8", "quantize+GEMM"), "weight_only": ("weight_only", None)}
SWEEP_MAX_REL_ERR = 0.02  # a candidate further than this from the torch backend's output does not count
HADAMARD_BUDGET = 0.05


def _load_json(path: str | None) -> tuple[Any, str | None]:
    """(data, None) or (None, why it is missing)."""
    if not path:
        return None, "not run"
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return None, f"no output ({p.name} missing or empty: the step failed or timed out)"
    try:
        return json.loads(p.read_text()), None
    except ValueError as exc:
        return None, f"unreadable output {p.name}: {exc}"


def best_rows(kernels: dict[str, Any]) -> dict[tuple[str, int, int, int], dict[str, Any]]:
    """(op, K, N, M) -> the fastest backend's row, with ``speedup`` = dense / time added."""
    best: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    for r in kernels.get("results", []):
        if not r.get("time_ms") or not r.get("dense_ms"):
            continue
        key = (r["op"], r["K"], r["N"], r["M"])
        if key not in best or r["time_ms"] < best[key]["time_ms"]:
            best[key] = {**r, "speedup": r["dense_ms"] / r["time_ms"]}
    return best


def sweep_worst(sweep: dict[str, Any] | None, op: str, m_ok: Any) -> tuple[float | None, str]:
    """The target's worst shape in GPU time: per swept shape, its fastest candidate that computed the
    torch backend's result (for W8A8, the quantize+GEMM entry); then the slowest of those shapes. The
    candidate may be one ``auto`` does not run yet (the sweep is what moves the heuristics); its name
    says which. (None, why) when nothing was swept."""
    sweep_op, only = SWEEP_OP[op]
    per_shape = []
    for r in (sweep or {}).get("rows", []):
        if r.get("op") != sweep_op or not m_ok(r.get("M", -1)):
            continue
        timed = [c for c in r.get("candidates", []) if c.get("vs_dense") and (only is None or c["name"] == only)
                 and c.get("rel_err_vs_torch", 1.0) <= SWEEP_MAX_REL_ERR]
        if timed:
            best = max(timed, key=lambda c: c["vs_dense"])
            per_shape.append((best["vs_dense"], f"{r['K']}×{r['N']} M={r['M']} ({best['name']})"))
    if not per_shape:
        return None, "not swept"
    value, where = min(per_shape)
    return value, f"worst: {where}, over {len(per_shape)} shapes"


def evaluate_targets(
    kernels: dict[str, Any] | None, steps: dict[str, Any] | None, sweep: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One dict per target: text, held (True/False/None = not measured), worst value, where, as eager
    calls (``bench``); and ``graph_value`` / ``graph_where`` / ``graph_held``, the same in GPU time
    from the tile sweep's CUDA-graph replays (no launch overhead), where it was swept."""
    out = []
    best = best_rows(kernels or {})
    for key, op, text, m_ok, minimum in TARGETS:
        rows = [r for (o, _, _, m), r in best.items() if o == op and m_ok(m)]
        graph_value, graph_where = sweep_worst(sweep, op, m_ok)
        graph = dict(graph_value=graph_value, graph_where=graph_where,
                     graph_held=None if graph_value is None else graph_value >= minimum)
        if not rows:
            out.append(dict(key=key, target=text, held=None, value=None, where="no shape with this M was measured",
                            **graph))
            continue
        worst = min(rows, key=lambda r: r["speedup"])
        out.append(
            dict(
                key=key,
                target=text,
                held=all(r["speedup"] >= minimum for r in rows),
                value=round(worst["speedup"], 3),
                where=f"worst: {worst['K']}×{worst['N']} M={worst['M']} ({worst['backend']}), over {len(rows)} shapes",
                **graph,
            )
        )
    quarot = [r for r in (steps or {}).get("rows", []) if r.get("hadamard_share") is not None]
    if quarot:
        worst = max(quarot, key=lambda r: r["hadamard_share"])
        out.append(
            dict(
                key="hadamard_share",
                target="online Hadamard ≤ 5 % of a block",
                held=worst["hadamard_share"] <= HADAMARD_BUDGET,
                value=worst["hadamard_share"],
                where=f"{worst['scheme']}, {worst['tokens']} tokens, one LLaDA-8B-shaped block",
            )
        )
    else:
        out.append(
            dict(
                key="hadamard_share",
                target="online Hadamard ≤ 5 % of a block",
                held=None,
                value=None,
                where="no QuaRot block step was measured",
            )
        )
    return out


def _tests_summary(path: str | None) -> str:
    if not path:
        return "not run"
    p = Path(path)
    if not p.is_file():
        return f"no result ({p.name} missing: the step failed before pytest wrote it, or timed out)"
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as exc:
        return f"unreadable {p.name}: {exc}"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failed = [
        f"{c.get('classname', '')}.{c.get('name', '')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    text = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    if failed:
        text += " — failing: " + ", ".join(failed[:10]) + (" …" if len(failed) > 10 else "")
    return text


def _scheme(s: Any) -> str:
    if not isinstance(s, dict):
        return str(s)
    g = s.get("group_size")
    return f"W{s.get('bits')} {'per channel' if g == -1 else f'g{g}'} {'symmetric' if s.get('symmetric') else 'asymmetric'}"


def _fmt_held(held: bool | None) -> str:
    return {True: "**held**", False: "**missed**", None: "not measured"}[held]


def _fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def render_section(
    *,
    bench: Any,
    bench_err: str | None,
    pipeline: Any,
    pipeline_err: str | None,
    steps: Any,
    steps_err: str | None,
    tests: str,
    meta: dict[str, Any],
    sweep: Any = None,
    sweep_err: str | None = None,
    overhead: Any = None,
    overhead_err: str | None = None,
) -> tuple[str, str]:
    """(device name, markdown section)."""
    kernels = (bench.get("kernels", bench) if isinstance(bench, dict) else None) or None
    step = bench.get("step") if isinstance(bench, dict) else None
    device = meta.get("gpu") or (kernels or {}).get("device") or "unknown device"
    date = meta.get("date") or _dt.date.today().isoformat()
    lines = [f"## GPU check: {device} ({date})", ""]
    facts = [f"`benchmarks/gpu_check.sh` on **{device}**"]
    for k, label in (("driver", "driver"), ("cuda", "CUDA"), ("torch", "torch"), ("triton", "triton")):
        v = meta.get(k) or (kernels or {}).get(k)
        if v:
            facts.append(f"{label} {v}")
    if kernels and "fast_hadamard_transform" in kernels:
        facts.append(f"fast-hadamard-transform {'installed' if kernels['fast_hadamard_transform'] else 'not installed'}")
    if meta.get("seconds"):
        facts.append(f"whole check {meta['seconds']} s")
    lines += [", ".join(facts) + ".", ""]
    if meta.get("dry_run"):
        lines += ["*Dry run on a CPU: the numbers below are a smoke test of the report, not GPU results.*", ""]
    statuses = meta.get("steps") or {}
    if statuses:
        lines += ["Steps: " + "; ".join(f"{k}: {v}" for k, v in statuses.items()) + ".", ""]
    if meta.get("tuned_table"):
        lines += [f"Bench and the block steps ran with the tuned table the sweep wrote first (`{meta['tuned_table']}`: "
                  "the fastest right candidate per op, shape and token count; `qdlm_export/kernels/tuned.py`).", ""]
    lines += [f"Kernel tests (native, `TRITON_INTERPRET=0`): {tests}.", ""]

    lines += ["### Targets", "",
              "Eager: `bench`, one Python call per product, as a model runs without CUDA graphs (what `auto` "
              "runs or any backend). GPU time: the tile sweep's CUDA-graph replays (launch overhead left out; "
              "W8A8 with its quantization kernel), the best candidate that matched the torch backend, which "
              "`auto` may not run yet.", "",
              "| target | eager | worst case | held? | GPU time, best candidate | worst case | held? |",
              "|---|---:|---|---|---:|---|---|"]
    for t in evaluate_targets(kernels, steps, sweep if isinstance(sweep, dict) else None):
        value = "—" if t["value"] is None else (
            f"{t['value']:.1%}" if t["key"] == "hadamard_share" else _fmt_x(t["value"])
        )
        graph = ("—", "—", "—") if t.get("graph_value") is None else (
            _fmt_x(t["graph_value"]), t["graph_where"], _fmt_held(t["graph_held"]))
        lines.append(f"| {t['target']} | {value} | {t['where']} | {_fmt_held(t['held'])} | {' | '.join(graph)} |")
    lines.append("")

    lines += ["### Kernels (`qdlm-export bench --full --json`)", ""]
    if kernels is None:
        lines += [f"Not measured: {bench_err}.", ""]
    else:
        dense = kernels.get("dense_dtype", "bf16")
        lines += [
            f"Speed-up against the dense {dense} `x @ W.T` timed in the same run (above 1 is faster); each op's "
            f"fastest backend, named. Weight-only: {_scheme(kernels.get('weight_only_scheme'))}; "
            f"median of {kernels.get('repetitions')} interleaved repetitions (their spread is in the JSON).",
            "",
            "| K × N | M | dense ms | W4A16 | W8A8 | W4A4 |",
            "|---|---:|---:|---|---|---|",
        ]
        best = best_rows(kernels)
        cells: dict[tuple[int, int, int], dict[str, str]] = {}
        dense_ms: dict[tuple[int, int, int], float] = {}
        for (op, k, n, m), r in best.items():
            cells.setdefault((k, n, m), {})[op] = f"{r['speedup']:.2f}× ({r['backend']})"
            dense_ms[(k, n, m)] = r["dense_ms"]
        for k, n, m in sorted(cells):
            c = cells[(k, n, m)]
            lines.append(
                f"| {k} × {n} | {m} | {dense_ms[(k, n, m)]:.3f} | {c.get('weight_only', '—')} | "
                f"{c.get('w8a8', '—')} | {c.get('w4a4', '—')} |"
            )
        lines.append("")
        failed = [r for r in kernels.get("results", []) if "error" in r]
        if failed:
            lines += [f"Backends that failed here ({len(failed)} rows, not timed):", ""]
            seen = set()
            for r in failed:
                if (r["op"], r["backend"], r["error"]) not in seen:
                    seen.add((r["op"], r["backend"], r["error"]))
                    lines.append(f"- {r['op']} on {r['backend']} (first at {r['K']} × {r['N']}, M={r['M']}): "
                                 f"`{r['error'][:200]}`")
            lines.append("")
    if step:
        lines += [
            f"Denoising step of the embedded tiny LLaDA (RTN W4 g128, {step.get('tokens')} tokens): "
            f"{step.get('speedup')}× the {step.get('dense_dtype')} model's speed; quantized linears hold "
            f"{step.get('linear_memory_ratio', 0):.1%} of their bf16 bytes.",
            "",
        ]

    lines += ["### One LLaDA-8B-shaped block, one denoising step (`benchmarks/bench_block_step.py`)", ""]
    if not steps:
        lines += [f"Not measured: {steps_err}.", ""]
    else:
        lines += [
            f"{steps.get('batch')} × {steps.get('seqlen')} tokens, block shapes {steps.get('shapes')}; speed-up "
            f"against the same block dense in {', '.join(sorted({str(r.get('dense_dtype')) for r in steps.get('rows', [])}))}, "
            "same run.",
            "",
            "| scheme | dense ms | quantized ms | speed-up | linear bytes / bf16 | online Hadamard share |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in steps.get("rows", []):
            share = "—" if r.get("hadamard_share") is None else f"{r['hadamard_share']:.1%}"
            lines.append(
                f"| {r['scheme']} | {r['dense_step_ms']} | {r['quantized_step_ms']} | {r['speedup']}× | "
                f"{r['linear_memory_ratio']:.3f} | {share} |"
            )
        lines.append("")

    lines += overhead_lines(overhead, overhead_err)
    lines += sweep_lines(sweep, sweep_err)
    lines += ["### GPTQ on a 4-block LLaDA-8B-shaped model (`benchmarks/bench_pipeline.py`)", ""]
    if not pipeline:
        lines += [f"Not measured: {pipeline_err}.", ""]
    else:
        lines += [
            f"{pipeline.get('method')} W4 g128, {pipeline.get('nsamples')} × {pipeline.get('seqlen')} calibration "
            f"tokens, device {pipeline.get('device')}.",
            "",
            "| blocks | checkpoint GB | peak RSS GB | s / block (median) | extrapolated 32 blocks |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in pipeline.get("rows", []):
            lines.append(
                f"| {r['blocks']} | {r['checkpoint_gb']} | {r['peak_rss_gb']} | {r['median_s_per_block']} | "
                f"{r['extrapolated_32_blocks_min']} min |"
            )
        lines.append("")
    return device, "\n".join(lines).rstrip() + "\n"


def overhead_lines(overhead: Any, overhead_err: str | None) -> list[str]:
    """Host time per call of each op (``benchmarks/launch_overhead.py``): what an eager layer costs
    when its GPU work is only microseconds."""
    lines = ["### Host time per call (`benchmarks/launch_overhead.py`)", ""]
    if not isinstance(overhead, dict) or not overhead.get("ops"):
        return lines + [f"Not measured: {overhead_err or 'no rows'}.", ""]
    shape = overhead.get("shape", {})
    native = overhead.get("mode") == "native"
    lines += [
        (f"Each op run back to back at {shape.get('M')} × {shape.get('K')} → {shape.get('N')} (microseconds of GPU "
         "work, so the time is host time: our Python, Triton's launch, torch's allocation), beside `F.linear` in bf16."
         if native else
         f"Stubbed (Triton's launches replaced by a counter: our Python alone), {shape.get('M')} × {shape.get('K')} "
         f"→ {shape.get('N')}."),
        "", "| op | µs per call, median | min | dense / ours |", "|---|---:|---:|---:|"]
    for name, row in overhead["ops"].items():
        ratio = row.get("dense_over_ours")
        lines.append(f"| {name} | {row.get('median_us')} | {row.get('min_us')} | {'—' if ratio is None else f'{ratio:.2f}×'} |")
    return lines + [""]


def sweep_lines(sweep: Any, sweep_err: str | None) -> list[str]:
    """The tile-configuration sweep: per op, shape and M, the heuristic's and the best candidate's
    speed-up against dense bf16, both in GPU time (CUDA graphs: no launch overhead)."""
    lines = ["### Triton tile configurations (`benchmarks/triton_sweep.py`)", ""]
    if not sweep:
        return lines + [f"Not measured: {sweep_err}.", ""]
    lines += [
        "GPU time from CUDA-graph replays (`do_bench_cudagraph`, median), so launch overhead is left out; "
        "speed-up = dense bf16 time / kernel time. Eager = the heuristic's time with Python launches.",
        "",
        "| op | K × N | M | dense ms | torch backend | heuristic | heuristic eager | best candidate | best |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in sweep.get("rows", []):
        heur = next((c for c in r.get("candidates", []) if c.get("name") == "heuristic"), {})
        torch_x = "—" if not r.get("torch_graph_ms") else _fmt_x(r["dense_graph_ms"] / r["torch_graph_ms"])
        eager_x = "—" if not heur.get("eager_ms") else _fmt_x(r["dense_eager_ms"] / heur["eager_ms"])
        lines.append(
            f"| {r['op']} | {r['K']} × {r['N']} | {r['M']} | {r['dense_graph_ms']:.4f} | {torch_x} | "
            f"{_fmt_x(heur.get('vs_dense'))} | {eager_x} | {r.get('best', '—')} | {_fmt_x(r.get('best_vs_dense'))} |"
        )
    if sweep.get("cut_short"):
        lines += ["", "*The sweep ran out of its time budget: shapes and token counts missing above were not measured.*"]
    failed = sorted({(r["op"], c["name"], c["error"][:120]) for r in sweep.get("rows", [])
                     for c in r.get("candidates", []) if "error" in c})
    if failed:
        lines += ["", "Candidates that did not run: " + "; ".join(f"{op} {name}: `{err}`" for op, name, err in failed[:8])]
    return lines + [""]


def _markers(device: str) -> tuple[str, str]:
    tag = re.sub(r"[^A-Za-z0-9 ._()-]", "", device).strip() or "unknown"
    return f"<!-- gpu-check: {tag} -->", f"<!-- /gpu-check: {tag} -->"


def insert_section(doc: str, device: str, section: str) -> str:
    """``doc`` with this device's section replaced (or appended at the end)."""
    start, end = _markers(device)
    block = f"{start}\n{section}{end}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc, count=1)
    return doc.rstrip("\n") + "\n\n" + block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--pipeline")
    parser.add_argument("--steps")
    parser.add_argument("--sweep")
    parser.add_argument("--overhead")
    parser.add_argument("--tests")
    parser.add_argument("--meta")
    parser.add_argument("--doc", help="markdown file to update in place (its section for this device)")
    parser.add_argument("--section-out", help="also write the section alone here")
    parser.add_argument("--targets-out", help="write the targets as JSON here")
    args = parser.parse_args(argv)

    bench, bench_err = _load_json(args.bench)
    pipeline, pipeline_err = _load_json(args.pipeline)
    steps, steps_err = _load_json(args.steps)
    meta, _ = _load_json(args.meta)
    sweep, sweep_err = _load_json(args.sweep)
    overhead, overhead_err = _load_json(args.overhead)
    device, section = render_section(
        bench=bench,
        bench_err=bench_err,
        pipeline=pipeline,
        pipeline_err=pipeline_err,
        steps=steps,
        steps_err=steps_err,
        tests=_tests_summary(args.tests),
        meta=meta or {},
        sweep=sweep,
        sweep_err=sweep_err,
        overhead=overhead,
        overhead_err=overhead_err,
    )
    if args.section_out:
        Path(args.section_out).write_text(section)
    if args.targets_out:
        kernels = bench.get("kernels", bench) if isinstance(bench, dict) else None
        Path(args.targets_out).write_text(json.dumps(evaluate_targets(kernels, steps, sweep), indent=2))
    if args.doc:
        doc = Path(args.doc)
        doc.write_text(insert_section(doc.read_text() if doc.exists() else "# Benchmarks\n", device, section))
        print(f"wrote the section for {device} into {doc}", file=sys.stderr)
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
