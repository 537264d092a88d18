"""Kernel micro-benchmarks at diffusion-LLM shapes: every available backend against the fastest dense matmul.

    run_kernel_benchmarks(quick=None, device=None, ...) -> dict     (JSON-serialisable)
    format_report(result) -> str                                    (a plain-text table)

For each GEMM shape ``K x N`` (in x out features) and token count ``M``, the dense ``x @ W.T`` is
timed in every dtype the device runs fast (CUDA: bfloat16 and float16; CPU: float32 and bfloat16,
since only some CPUs have bf16 matrix units) in the same interleaved repetitions as the quantized
ops; the fastest is the baseline. The quantized ops get activations in the dtype a short dense
probe found fastest, and weights quantized (RTN) from the same float weight as the dense one:

* ``weight_only``: ``weight_only_linear`` on a ``bits``-bit, ``group_size`` packed weight;
* ``w8a8``: per-token int8 quantize + int8 GEMM (per-channel int8 weight);
* ``w4a4``: per-token 4-bit quantize + packed 4-bit weight GEMM (per channel).

With ``peers=True`` torchao's int4 weight-only and int8 dynamic-activation linears, quantized from
the same float weight, run in the same repetitions (``bench/peers.py``), and ours / theirs is reported.

Timing (``bench/timing.py``): warm-up, then ``repetitions`` interleaved rounds; per row ``ratio`` is
the median over rounds of time / dense time of that round (< 1 is faster than dense), with the
round-to-round min and max (``ratio_low``, ``ratio_high``). On a CPU the run uses ``threads``
threads (default 1: stable on a shared machine). Also reported: the peak extra memory during one
call and the resident weight bytes. Peak memory is the CUDA allocator's high-water mark on GPUs; on
CPU it is the process RSS sampled every millisecond during the call, above its level before
(approximate; small temporaries are missed).

Timings are what this machine measured once: compare ratios within one run only.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import time
from typing import Any, Callable

import torch

from ..core.packing import pack_rows
from ..core.schemes import WeightScheme, quantize_rtn
from .. import kernels as D
from ..kernels import cpu_native, cpu_packed, cuda_tinygemm, layouts
from ..kernels._triton import fast_hadamard_transform_available, triton_version
from .timing import (
    DEFAULT_MIN_RUN_TIME,
    DEFAULT_REPETITIONS,
    clock_for,
    dense_dtypes,
    dtype_name,
    fastest,
    format_ratio,
    interleaved_times,
    median_ms,
    ratio_stats,
    sync,
    torch_threads,
)

# (in_features K, out_features N): LLaDA-8B attention/MLP, Dream-7B MLP
SHAPES_FULL = ((4096, 4096), (4096, 12288), (12288, 4096), (3584, 18944))
M_FULL = (16, 256, 1024, 4096)
SHAPES_QUICK = ((4096, 4096), (12288, 4096))
M_QUICK = (16, 256)
OPS = ("weight_only", "w8a8", "w4a4")
CPU_THREADS = 1  # see timing.torch_threads


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - not Linux
        return 0


def _peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated above the starting level at the peak of one call of ``fn``."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], _rss_bytes()) - base)


def _backends(op: str, device: torch.device, **params: Any) -> list[D.registry.Backend]:
    """Backends of ``op`` that can run here (never the Triton interpreter: it is not a benchmark)."""
    found, impls = [], set()
    for b in D.backends_for(op):
        if b.family == "triton" and device.type != "cuda":
            continue
        if b.impl not in impls and b.unsupported(D.Problem(op, device, params)) is None:
            found.append(b)
            impls.add(b.impl)  # one entry per implementation (torch._int_mm and torch share one)
    return found


def quantized_weights(w32: torch.Tensor, bits: int, group_size: int, device: torch.device) -> dict[str, tuple]:
    """RTN of the float weight ``w32 [N, K]`` in each op's layout: op -> its weight tensors."""
    wo = quantize_rtn(w32, WeightScheme(bits, group_size, True), scale_dtype=torch.bfloat16)
    w8 = quantize_rtn(w32, WeightScheme(8, -1, True))
    w4 = quantize_rtn(w32, WeightScheme(4, -1, True), scale_dtype=torch.bfloat16)
    return {
        "weight_only": (pack_rows(wo.codes, bits).to(device), wo.scale.to(device)),
        "w8a8": (pack_rows(w8.codes, 8).to(device), w8.scale.to(device)),
        "w4a4": (pack_rows(w4.codes, 4).to(device), w4.scale.to(device)),
    }


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cases(op: str, x: torch.Tensor, k: int, n: int, bits: int, group_size: int, weights: dict[str, tuple]):
    """(backend, is auto's pick, callable, weight bytes) for one op at one shape."""
    device, m = x.device, x.shape[0]
    out = []
    if op == "weight_only":
        packed, scale = weights[op]
        params = dict(M=m, K=k, N=n, bits=bits, group_size=group_size, symmetric=True, dtype=x.dtype)
        auto = D.select_backend("weight_only_linear", device, **params)
        for b in _backends("weight_only_linear", device, **params):
            fn = functools.partial(D.weight_only_linear, x, packed, scale, None, bits, group_size, k, backend=b.name)
            out.append((b.name, b.impl is auto.impl, fn, _nbytes(packed, scale)))
    elif op in ("w8a8", "w4a4"):
        # what a loaded checkpoint runs: per-token quantization, then the packed weight's integer GEMM
        # (symmetric per-channel codes as the format packs them: 8 bits a byte, 4 bits a nibble)
        packed, scale = weights[op]
        wbits = 8 if op == "w8a8" else 4
        params = dict(M=m, K=k, N=n, bits=wbits, group_size=-1, symmetric=True)
        auto = D.select_backend("packed_int_linear", device, dtype=x.dtype, **params)
        for b in _backends("packed_int_linear", device, **params):
            gemm = functools.partial(D.packed_int_linear, weight_packed=packed, weight_scale=scale, weight_zero_point=None,
                                     bits=wbits, group_size=-1, in_features=k, out_dtype=x.dtype, backend=b.name)
            out.append((b.name, b.impl is auto.impl, _quantize_then(x, wbits, b.name, gemm), _nbytes(packed, scale)))
    else:
        raise ValueError(f"unknown benchmark op {op!r}; choose from {OPS}")
    return out


def _quantize_then(x: torch.Tensor, bits: int, backend: str, gemm: Callable[..., Any]) -> Callable[[], Any]:
    """A weight-activation candidate: per-token quantization of ``x`` (Triton's with a Triton GEMM, else
    the one auto runs, as ``w8a8_linear`` / ``w4a4_linear`` do), then ``gemm(x_q, x_scale)``."""
    q_name = "triton" if backend == "triton" else None

    def run():
        x_q, x_s = D.quantize_per_token(x, bits, backend=q_name)
        return gemm(x_q, x_s)

    return run


def _activation_dtype(x32: torch.Tensor, weights: dict, device: torch.device, min_run_time: float, clock) -> torch.dtype:
    """The quantized ops' input dtype: the 16-bit dense dtype that one short interleaved probe finds
    fastest (no probe where there is one). Quantized models run 16-bit activations; float32 stays a
    baseline candidate only. (Probing float32 too, a cold 12288 x 4096 row at M = 1 on a Xeon, where
    float32 tied bf16, sometimes gave the quantized ops float32 inputs and so auto's exact torch path.)"""
    half = {dt: w for dt, w in weights.items() if dt.itemsize == 2} or weights
    if len(half) == 1:
        return next(iter(half))
    xs = {dt: x32.to(device=device, dtype=dt) for dt in half}
    fns = {dt: functools.partial(torch.matmul, xs[dt], w.T) for dt, w in half.items()}
    before = {dt: functools.partial(_evict, lambda w=w: [w]) for dt, w in half.items()} if cold_weights(device) else None
    times = interleaved_times(fns, device, repetitions=1, min_run_time=min_run_time, clock=clock, before=before)
    return fastest(times, list(fns))


def cold_weights(device: torch.device) -> bool:
    """Whether weights are evicted from the caches before every timed call: on CPUs where the native
    library runs (see ``timing.py``). GPUs and other CPUs time them as the calls leave them."""
    return device.type == "cpu" and cpu_native.library() is not None


def _evict(tensors_now: Callable[[], list[torch.Tensor]]) -> None:
    cpu_native.evict_from_caches(tensors_now())


def _weights_of(name: str, weights: dict, qweights: dict, peers: dict, packed: torch.Tensor | None) -> list[torch.Tensor]:
    """The weight tensors candidate ``name`` reads: a dense weight, an op's quantized tensors plus the
    layout its backend cached (made during warm-up, so looked up at each call), or a peer's module."""
    kind, label = name.split(":", 1)
    if kind == "dense":
        return [weights[_dtype_of(name, weights)]]
    if kind == "peer":
        module = peers[label]["module"]
        return [*module.parameters(), *module.buffers()]
    held = {"cpu_packed": cpu_packed.cached_tensors, "cpu_native": cpu_native.cached_tensors}.get(label)
    return [*qweights[kind], *(held(packed) if held and packed is not None else [])]


def run_kernel_benchmarks(
    quick: bool | None = None,
    device: str | torch.device | None = None,
    *,
    bits: int = 4,
    group_size: int = 128,
    ops: tuple[str, ...] | list[str] = OPS,
    m_values: tuple[int, ...] | list[int] | None = None,
    shapes: tuple[tuple[int, int], ...] | list[tuple[int, int]] | None = None,
    repeat: int | None = None,
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    warmup: int = 1,
    threads: int | None = None,
    peers: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark every op on every available backend; returns a JSON-serialisable dict.

    ``quick`` (default: True on CPU, False on CUDA) uses M in {16, 256} and K x N in
    {4096 x 4096, 12288 x 4096}; the full grid is M in {16, 256, 1024, 4096} and K x N in
    {4096 x 4096, 4096 x 12288, 12288 x 4096, 3584 x 18944}. ``repeat``: interleaved repetitions
    (default 5); ``warmup``: calls before timing (the block sizing adds a few more). ``threads`` (CPU; default 1) sets torch's
    intra-op threads for the run. ``peers`` adds torchao's linears where torchao imports (else the
    result's ``peers`` is None and ``peers_skipped`` says why).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quick is None:
        quick = dev.type != "cuda"
    m_values = tuple(m_values or (M_QUICK if quick else M_FULL))
    shapes = tuple(tuple(s) for s in (shapes or (SHAPES_QUICK if quick else SHAPES_FULL)))  # type: ignore[misc]
    repetitions = repeat or DEFAULT_REPETITIONS
    if threads is None and dev.type == "cpu":
        threads = CPU_THREADS
    peer_skip = None
    if peers:
        from .peers import torchao_unavailable_reason

        peer_skip = torchao_unavailable_reason()
    peer_rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with torch_threads(threads if dev.type == "cpu" else None) as used_threads, torch.no_grad():
        clock, clock_name = clock_for(dev, used_threads)
        for k, n in shapes:
            w32 = torch.randn(n, k, generator=gen) * 0.02
            weights = {dt: w32.to(device=dev, dtype=dt) for dt in dense_dtypes(dev)}
            qweights = quantized_weights(w32, bits, group_size, dev)
            peer_modules: dict[torch.dtype, dict] = {}
            for m in m_values:
                x32 = torch.randn(m, k, generator=gen)
                rows_here, peers_here = _measure_shape(
                    x32, w32, weights, qweights, peer_modules if peers and peer_skip is None else None,
                    dev, k, n, bits, group_size, ops, repetitions, min_run_time, warmup, clock, progress,
                )
                rows += rows_here
                peer_rows += peers_here
    result = {
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {used_threads} threads)",
        "device_type": dev.type,
        "threads": used_threads if dev.type == "cpu" else None,
        "torch": torch.__version__,
        "triton": triton_version(),
        "fast_hadamard_transform": fast_hadamard_transform_available(),
        "dense_dtype": "fastest of " + ", ".join(dtype_name(dt) for dt in dense_dtypes(dev)) + " (per row)",
        "weight_only_scheme": {"bits": bits, "group_size": group_size, "symmetric": True},
        "quick": quick,
        "repetitions": repetitions,
        "min_run_time_s": min_run_time,
        "clock": clock_name,
        "timing": "interleaved repetitions; per repetition the fastest block of calls; ratio = median over "
        "repetitions of time / dense time, low/high = their min/max",
        "weights": "cold: evicted from the CPU caches before each timed call" if cold_weights(dev)
        else "as the calls leave them (warm when they fit in the caches)",
        "peak_mem_method": "cuda_max_memory_allocated" if dev.type == "cuda" else "rss_sampled_1ms",
        "seconds": round(time.perf_counter() - started, 2),
        "results": rows,
    }
    if peers:
        from .peers import torchao_version

        result["peers"] = None if peer_skip else {"library": "torchao", "version": torchao_version(), "rows": peer_rows}
        if peer_skip:
            result["peers_skipped"] = peer_skip
    return result


def _measure_shape(x32, w32, weights, qweights, peer_modules, dev, k, n, bits, group_size, ops, repetitions,
                   min_run_time, warmup, clock, progress) -> tuple[list[dict], list[dict]]:
    """Rows of one (K, N, M): every candidate and every dense dtype in the same interleaved rounds."""
    m = x32.shape[0]
    act_dtype = _activation_dtype(x32, weights, dev, min_run_time, clock)
    xs = {dt: x32.to(device=dev, dtype=dt) for dt in weights}
    x = xs[act_dtype]
    fns: dict[str, Callable[[], Any]] = {
        f"dense:{dtype_name(dt)}": functools.partial(torch.matmul, xs[dt], w.T) for dt, w in weights.items()
    }
    cases = {}
    for op in ops:
        for backend, auto, fn, wbytes in _cases(op, x, k, n, bits, group_size, qweights):
            fns[f"{op}:{backend}"] = fn
            cases[f"{op}:{backend}"] = (op, backend, auto, fn, wbytes)
    peers = {}
    if peer_modules is not None:
        if act_dtype not in peer_modules:
            from .peers import build_peers

            peer_modules[act_dtype] = build_peers(w32.to(dev), act_dtype, group_size)
        for name, peer in peer_modules[act_dtype].items():
            if "module" in peer:
                fns[f"peer:{name}"] = functools.partial(peer["module"], x)
            peers[name] = peer
    failures = _drop_failing(fns, cases, m, k, n)
    packed = qweights["weight_only"][0] if "weight_only" in qweights else None
    if packed is not None:  # each token count starts without a CPU layout, so held bytes are its own
        cpu_packed.forget(packed)
        cpu_native.forget(packed)
    before = None
    if cold_weights(dev):
        before = {name: functools.partial(_evict, functools.partial(_weights_of, name, weights, qweights, peers, packed))
                  for name in fns}
    times = interleaved_times(fns, dev, repetitions=repetitions, min_run_time=min_run_time, warmup=warmup, clock=clock,
                              before=before)
    dense_names = [name for name in fns if name.startswith("dense:")]
    base = fastest(times, dense_names)
    dense_ms = median_ms(times[base])
    w = weights[_dtype_of(base, weights)]
    common = dict(
        M=m, K=k, N=n,
        dense_ms=round(dense_ms, 4),
        dense_repetition_ms=[round(t, 4) for t in times[base]],
        dense_dtype=base.split(":", 1)[1],
        dense_ms_by_dtype={name.split(":", 1)[1]: round(median_ms(times[name]), 4) for name in dense_names},
        activation_dtype=dtype_name(act_dtype),
        dense_peak_mem_bytes=_peak_extra_memory(fns[base], dev),
        dense_weight_bytes=_nbytes(w),
        bf16_weight_bytes=w.numel() * 2,
    )
    if progress:
        progress(f"K={k} N={n} M={m}: dense {dense_ms:.2f} ms ({common['dense_dtype']})")
    rows = []
    for key, (op, backend, auto, fn, wbytes) in cases.items():
        stats = ratio_stats(times[key], times[base])
        rows.append(dict(
            op=op, backend=backend, auto=auto, **common,
            time_ms=round(median_ms(times[key]), 4),
            ratio=stats["median"], ratio_low=stats["low"], ratio_high=stats["high"],
            repetitions=stats["repetitions"],
            repetition_ms=[round(t, 4) for t in times[key]],
            peak_mem_bytes=_peak_extra_memory(fn, dev),
            weight_bytes=wbytes,
            # what the op holds once it has run at this M: the checkpoint layout plus any cached repack
            held_weight_bytes=wbytes + _cached_nbytes(backend, packed),
        ))
        if progress:
            progress(f"  {op:12s} {backend:24s} {rows[-1]['time_ms']:9.2f} ms  x{format_ratio(**_three(stats))}")
    peer_rows = [_peer_row(name, peer, cases, times, base, x, w32, common) for name, peer in peers.items()]
    return rows + failures, peer_rows


def _drop_failing(fns: dict, cases: dict, m: int, k: int, n: int) -> list[dict[str, Any]]:
    """Call each quantized candidate once; one that raises (a kernel that does not compile on this
    device, say) leaves the timing and becomes a row with its ``error``, so the rest are still measured."""
    failures = []
    for key in list(cases):
        try:
            fns[key]()
        except Exception as exc:  # noqa: BLE001 - any failure of one backend is reported, not fatal
            op, backend = cases.pop(key)[:2]
            del fns[key]
            failures.append(dict(op=op, backend=backend, M=m, K=k, N=n, error=f"{type(exc).__name__}: {exc}"[:500]))
    return failures


def _cached_nbytes(backend: str, packed: torch.Tensor | None) -> int:
    """What a weight-only backend that repacks keeps beside the checkpoint's tensors once it has run."""
    if packed is None:
        return 0
    cached = {"cpu_packed": cpu_packed.cached_nbytes, "cpu_native": cpu_native.cached_nbytes,
              "cuda_tinygemm": cuda_tinygemm.cached_nbytes, "triton": layouts.group_major_nbytes}.get(backend)
    return 0 if cached is None else cached(packed)


def _dtype_of(name: str, weights: dict) -> torch.dtype:
    return next(dt for dt in weights if dtype_name(dt) == name.split(":", 1)[1])


def _three(stats: dict) -> dict:
    return {"median": stats["median"], "low": stats["low"], "high": stats["high"]}


def _peer_row(name, peer, cases, times, base, x, w32, common) -> dict[str, Any]:
    """One peer at one shape: its ratio to dense, ours / theirs per round, both outputs' error."""
    from .peers import relative_error

    row: dict[str, Any] = dict(peer=name, our_op=peer["our_op"], M=common["M"], K=common["K"], N=common["N"],
                               activation_dtype=common["activation_dtype"], dense_dtype=common["dense_dtype"])
    ours = next((key for key, case in cases.items() if case[0] == peer["our_op"] and case[2]), None)
    if "module" not in peer or ours is None:
        row["error"] = peer.get("error") or f"our {peer['our_op']} was not timed (not in --ops)"
        return row
    key = f"peer:{name}"
    vs_dense, vs_peer = ratio_stats(times[key], times[base]), ratio_stats(times[ours], times[key])
    reference = x.double() @ w32.to(x.device).double().T
    row.update(
        config=peer["config"],
        our_backend=cases[ours][1],
        time_ms=round(median_ms(times[key]), 4),
        our_time_ms=round(median_ms(times[ours]), 4),
        ratio=vs_dense["median"], ratio_low=vs_dense["low"], ratio_high=vs_dense["high"],
        ours_over_peer=vs_peer["median"], ours_over_peer_low=vs_peer["low"], ours_over_peer_high=vs_peer["high"],
        repetitions=vs_peer["repetitions"],
        # both against the float64 product with the float weight they were quantized from
        our_error_vs_float=round(relative_error(cases[ours][3](), reference), 5),
        peer_error_vs_float=round(relative_error(peer["module"](x), reference), 5),
    )
    return row


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_kernel_benchmarks`' result."""
    mb = 1 / 2**20
    lines = [
        f"device: {result['device']}  torch {result['torch']}  triton {result['triton']}  "
        f"dense {result['dense_dtype']}  ({result['seconds']} s; {result['repetitions']} interleaved repetitions, "
        f"ratio = median ± farthest repetition)",
        f"{'op':12s} {'backend':24s} {'K':>6s} {'N':>6s} {'M':>5s} {'ms':>9s} {'dense ms':>9s} {'dense':>8s} "
        f"{'ratio':>12s} {'peak MiB':>9s} {'dense MiB':>9s} {'weight MiB':>10s} {'held MiB':>9s}",
    ]
    for r in result["results"]:
        if "error" in r:
            lines.append(f"{r['op']:12s} {r['backend']:24s} {r['K']:6d} {r['N']:6d} {r['M']:5d} failed: {r['error']}")
            continue
        ratio = format_ratio(r["ratio"], r.get("ratio_low", r["ratio"]), r.get("ratio_high", r["ratio"]))
        lines.append(
            f"{r['op']:12s} {r['backend'] + ('*' if r.get('auto') else ''):24s} {r['K']:6d} {r['N']:6d} {r['M']:5d} "
            f"{r['time_ms']:9.2f} {r['dense_ms']:9.2f} {r.get('dense_dtype', ''):>8s} {ratio:>12s} "
            f"{r['peak_mem_bytes'] * mb:9.1f} {r['dense_peak_mem_bytes'] * mb:9.1f} {r['weight_bytes'] * mb:10.1f} "
            f"{r.get('held_weight_bytes', r['weight_bytes']) * mb:9.1f}"
        )
    lines.append(
        f"peak memory: {result['peak_mem_method']}; ratio = time / fastest dense time (below 1 is faster); "
        "held = weight plus any layout the backend cached at this M; * = the backend auto picks"
    )
    if "weights" in result:
        lines.append(f"weights: {result['weights']}")
    if "peers" in result:
        lines += format_peers(result)
    return "\n".join(lines)


def format_peers(result: dict[str, Any]) -> list[str]:
    """Lines of the torchao comparison (or the line saying why it was skipped)."""
    peers = result.get("peers")
    if peers is None:
        return [f"peers skipped: {result.get('peers_skipped', 'not requested')}"]
    lines = [
        f"peers: torchao {peers['version']} (eager), same float weights and inputs; "
        "ours/theirs below 1 means ours is faster",
        f"{'peer':18s} {'ours':22s} {'K':>6s} {'N':>6s} {'M':>5s} {'theirs ms':>10s} {'ours ms':>9s} "
        f"{'ours/theirs':>12s} {'theirs/dense':>12s} {'err ours':>9s} {'err theirs':>10s}",
    ]
    for r in peers["rows"]:
        if "error" in r:
            lines.append(f"{r['peer']:18s} not timed: {r['error']}")
            continue
        lines.append(
            f"{r['peer']:18s} {r['our_op'] + ':' + r['our_backend']:22s} {r['K']:6d} {r['N']:6d} {r['M']:5d} "
            f"{r['time_ms']:10.2f} {r['our_time_ms']:9.2f} "
            f"{format_ratio(r['ours_over_peer'], r['ours_over_peer_low'], r['ours_over_peer_high']):>12s} "
            f"{format_ratio(r['ratio'], r['ratio_low'], r['ratio_high']):>12s} "
            f"{r['our_error_vs_float']:9.4f} {r['peer_error_vs_float']:10.4f}"
        )
    lines.append("err = relative error against the float64 product with the unquantized weight")
    return lines
