"""Kernel micro-benchmarks at diffusion-LLM shapes: every available backend against a dense matmul.

    run_kernel_benchmarks(quick=None, device=None, ...) -> dict     (JSON-serialisable)
    format_report(result) -> str                                    (a plain-text table)

For each GEMM shape ``K x N`` (in x out features) and token count ``M``, the dense baseline
``x @ W.T`` is timed in the same run (bf16 on CUDA; on a CPU float32 *and* bfloat16, the faster one
is the baseline and the quantized ops get activations in its dtype), then each quantized op on every
backend that can run it:

* ``weight_only``: ``weight_only_linear`` on a ``bits``-bit, ``group_size`` packed weight;
* ``w8a8``: per-token int8 quantize + int8 GEMM (per-channel int8 weight);
* ``w4a4``: per-token 4-bit quantize + packed 4-bit weight GEMM (per channel).

Reported per row: median time, ``ratio`` = time / dense time (< 1 is faster than dense), the peak
extra memory during the call and the resident weight bytes. Peak memory is the CUDA allocator's
high-water mark on GPUs; on CPU there is no allocator counter, so it is the process RSS sampled every
millisecond during the call, above its level before (approximate; small temporaries are missed).

Timings are what this machine measured once: compare ratios within one run only.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import threading
import time
from typing import Any, Callable

import torch

from ..core.packing import pack_rows
from .. import kernels as D
from ..kernels._triton import fast_hadamard_transform_available, triton_version

# (in_features K, out_features N): LLaDA-8B attention/MLP, Dream-7B MLP
SHAPES_FULL = ((4096, 4096), (4096, 12288), (12288, 4096), (3584, 18944))
M_FULL = (16, 256, 1024, 4096)
SHAPES_QUICK = ((4096, 4096), (12288, 4096))
M_QUICK = (16, 256)
OPS = ("weight_only", "w8a8", "w4a4")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - not Linux
        return 0


def _peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated above the starting level at the peak of one call of ``fn``."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
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


def _backends(op: str, device: torch.device, **params: Any) -> list[str]:
    """Backends of ``op`` that can run here (never the Triton interpreter: it is not a benchmark)."""
    names, impls = [], set()
    for b in D.backends_for(op):
        if b.family == "triton" and device.type != "cuda":
            continue
        if b.impl not in impls and b.unsupported(D.Problem(op, device, params)) is None:
            names.append(b.name)
            impls.add(b.impl)  # one entry per implementation (torch._int_mm and torch share one)
    return names


def _cases(op: str, x: torch.Tensor, k: int, n: int, bits: int, group_size: int, gen: torch.Generator):
    """(label, backend name, callable, weight bytes) for one op at one shape."""
    device = x.device
    m = x.shape[0]
    out = []
    if op == "weight_only":
        groups = 1 if group_size == -1 else k // group_size
        codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
        packed = pack_rows(codes, bits).to(device)
        scale = (torch.rand(n, groups, generator=gen) * 0.01).to(device=device, dtype=torch.bfloat16)
        wbytes = packed.numel() * 4 + scale.numel() * 2
        for name in _backends(
            "weight_only_linear", device, M=m, K=k, N=n, bits=bits, group_size=group_size, dtype=x.dtype
        ):
            out.append(
                (
                    name,
                    lambda name=name: D.weight_only_linear(x, packed, scale, None, bits, group_size, k, backend=name),
                    wbytes,
                )
            )
    elif op == "w8a8":
        w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
        w_s = (torch.rand(n, generator=gen) * 0.01).to(device)
        wbytes = w_q.numel() + w_s.numel() * 4
        for name in _backends("int8_gemm", device, M=m, K=k, N=n, dtype=x.dtype):
            # the activation quantizer runs on the GEMM's family (triton with triton, else torch)
            q_name = "triton" if name == "triton" else "torch"

            def run(name=name, q_name=q_name):
                x_q, x_s = D.quantize_per_token(x, 8, backend=q_name)
                return D.int8_gemm(x_q, x_s, w_q, w_s, None, x.dtype, backend=name)

            out.append((name, run, wbytes))
    elif op == "w4a4":
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        packed = pack_rows(codes, 4).to(device)
        scale = (torch.rand(n, 1, generator=gen) * 0.01).to(device=device, dtype=torch.bfloat16)
        wbytes = packed.numel() * 4 + scale.numel() * 2
        for name in _backends("packed_int_linear", device, M=m, K=k, N=n, bits=4, group_size=-1, symmetric=True):
            out.append((name, lambda name=name: D.w4a4_linear(x, packed, scale, None, -1, k, backend=name), wbytes))
    else:
        raise ValueError(f"unknown benchmark op {op!r}; choose from {OPS}")
    return out


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
    warmup: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark every op on every available backend; returns a JSON-serialisable dict.

    ``quick`` (default: True on CPU, False on CUDA) uses M in {16, 256} and K x N in
    {4096 x 4096, 12288 x 4096}; the full grid is M in {16, 256, 1024, 4096} and K x N in
    {4096 x 4096, 4096 x 12288, 12288 x 4096, 3584 x 18944}.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quick is None:
        quick = dev.type != "cuda"
    m_values = tuple(m_values or (M_QUICK if quick else M_FULL))
    shapes = tuple(tuple(s) for s in (shapes or (SHAPES_QUICK if quick else SHAPES_FULL)))  # type: ignore[misc]
    repeat = repeat or (3 if dev.type == "cpu" else 20)
    warmup = warmup if warmup is not None else (1 if dev.type == "cpu" else 5)
    # The baseline is the fastest dense path of the device, timed in the same run: bf16 on CUDA; on a
    # CPU both float32 and bfloat16 (AMX/AVX512-BF16 CPUs run bf16 GEMMs several times faster, others
    # slower). The quantized ops then take activations in the baseline's dtype.
    dense_dtypes = (torch.bfloat16,) if dev.type == "cuda" else (torch.float32, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for k, n in shapes:
        w32 = torch.randn(n, k, generator=gen) * 0.02
        weights = {dt: w32.to(device=dev, dtype=dt) for dt in dense_dtypes}
        del w32
        for m in m_values:
            x32 = torch.randn(m, k, generator=gen)
            dense_by_dtype = {}
            for dt, w in weights.items():
                xd = x32.to(device=dev, dtype=dt)
                dense_by_dtype[dt] = _time(functools.partial(torch.matmul, xd, w.T), dev, repeat, warmup)
            dtype = min(dense_by_dtype, key=dense_by_dtype.get)
            x, w = x32.to(device=dev, dtype=dtype), weights[dtype]
            dense = functools.partial(torch.matmul, x, w.T)
            dense_ms = dense_by_dtype[dtype]
            dense_mem = _peak_extra_memory(dense, dev)
            base = dict(
                M=m,
                K=k,
                N=n,
                dense_ms=round(dense_ms, 4),
                dense_dtype=str(dtype).replace("torch.", ""),
                dense_ms_by_dtype={str(dt).replace("torch.", ""): round(t, 4) for dt, t in dense_by_dtype.items()},
                dense_peak_mem_bytes=dense_mem,
                dense_weight_bytes=w.numel() * w.element_size(),
                bf16_weight_bytes=w.numel() * 2,
            )
            if progress:
                progress(f"K={k} N={n} M={m}: dense {dense_ms:.2f} ms ({base['dense_dtype']})")
            for op in ops:
                for label, fn, wbytes in _cases(op, x, k, n, bits, group_size, gen):
                    ms = _time(fn, dev, repeat, warmup)
                    rows.append(
                        dict(
                            op=op,
                            backend=label,
                            **base,
                            time_ms=round(ms, 4),
                            ratio=round(ms / dense_ms, 3),
                            peak_mem_bytes=_peak_extra_memory(fn, dev),
                            weight_bytes=wbytes,
                        )
                    )
                    if progress:
                        progress(f"  {op:12s} {label:24s} {ms:9.2f} ms  x{ms / dense_ms:.2f}")
    return {
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "device_type": dev.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "fast_hadamard_transform": fast_hadamard_transform_available(),
        "dense_dtype": "bfloat16" if dev.type == "cuda" else "fastest of float32, bfloat16 (per row)",
        "weight_only_scheme": {"bits": bits, "group_size": group_size, "symmetric": True},
        "quick": quick,
        "repeat": repeat,
        "peak_mem_method": "cuda_max_memory_allocated" if dev.type == "cuda" else "rss_sampled_1ms",
        "seconds": round(time.perf_counter() - started, 2),
        "results": rows,
    }


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_kernel_benchmarks`' result."""
    mb = 1 / 2**20
    lines = [
        f"device: {result['device']}  torch {result['torch']}  triton {result['triton']}  "
        f"dense {result['dense_dtype']}  ({result['seconds']} s, median of {result['repeat']})",
        f"{'op':12s} {'backend':24s} {'K':>6s} {'N':>6s} {'M':>5s} {'ms':>9s} {'dense ms':>9s} {'dense':>8s} {'ratio':>6s} "
        f"{'peak MiB':>9s} {'dense MiB':>9s} {'weight MiB':>10s}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['op']:12s} {r['backend']:24s} {r['K']:6d} {r['N']:6d} {r['M']:5d} {r['time_ms']:9.2f} "
            f"{r['dense_ms']:9.2f} {r.get('dense_dtype', ''):>8s} {r['ratio']:6.2f} {r['peak_mem_bytes'] * mb:9.1f} "
            f"{r['dense_peak_mem_bytes'] * mb:9.1f} {r['weight_bytes'] * mb:10.1f}"
        )
    lines.append(f"peak memory: {result['peak_mem_method']}; ratio = time / dense time (below 1 is faster)")
    return "\n".join(lines)
