"""Timing that holds on a busy machine: warm-up, interleaved repetitions, median with its spread.

    interleaved_times(fns, device, repetitions=5, min_run_time=0.05, before=None) -> {name: [ms per repetition]}
    ratio_stats(candidate_ms, baseline_ms) -> {"median", "low", "high", "repetitions"}

Each repetition times every callable once, in a rotated order, so slow drift (another job starting,
clock changes) hits candidate and baseline alike. One repetition of one callable runs blocks of
``number`` calls (sized once, during warm-up, so that a block takes at least ``BLOCK_S``) until
``min_run_time`` has passed (the scheme of ``torch.utils.benchmark.Timer.blocked_autorange``
without re-sizing the block every repetition) and keeps the fastest block's time per call: another
job taking the core only ever adds time, so the fastest block is the one least disturbed (the
median block was not stable enough on a busy 2-core machine). The clock (:func:`clock_for`) is the
calling thread's CPU time when a CPU run uses one thread (time the core spent on someone else is not
counted; our compute all runs on that thread), else wall time after a device sync. Ratios are taken per repetition
(candidate and baseline of the same round) and summarised by their median and min-max range.

``before`` (name -> callable) runs untimed before every call of that callable, which is then timed
call by call: the benchmark evicts each candidate's weights from the CPU caches there, so that every
call reads them from memory, as in a model too large for the caches. Timed warm, memory-bound rows
moved with how much of their weight the shared last-level cache still held after the other
candidates and other jobs ran: the W8A8 GEMM at 12288 x 4096, M = 16 took 0.44, 0.51 and 0.54 of
the dense time in three runs (``torch._int_mm`` 0.62-0.89); cold, 0.54-0.57 (0.97-1.01).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import torch

BLOCK_S = 0.01  # a block of calls at least this long keeps timer overhead far below 1 %
# A call slower than min_run_time would otherwise be timed once per repetition: a single sample of a
# memory-bound op (dequantizing a 50 M-weight matrix) swung by 20-30 % between runs on a quiet
# machine; the fastest of three did not (docs/benchmarks.md, stability).
MIN_BLOCKS = 3
DEFAULT_REPETITIONS = 5
DEFAULT_MIN_RUN_TIME = 0.1


def dense_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dense dtypes timed as baseline candidates: CUDA's two half types; on a CPU float32 and
    bfloat16, since only some CPUs have bf16 matrix units (AMX, AVX512-BF16)."""
    return (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def clock_for(device: torch.device, threads: int | None) -> tuple[Callable[[], float], str]:
    """(clock in seconds, its name): thread CPU time for a 1-thread CPU run, else wall time."""
    if device.type == "cpu" and threads == 1:
        return time.thread_time, "thread_cpu_time"
    return time.perf_counter, "wall_time"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the body with ``threads`` intra-op threads (None: leave as is); yields the count used.

    One thread is the stable choice on a shared CPU: an OpenMP region with a thread descheduled by
    another job waits out a whole time slice, so multi-thread timings jump in steps of ~10 ms."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _block_size(fn: Callable[[], Any], device: torch.device, warmup: int, clock: Callable[[], float],
                before: Callable[[], Any] | None = None) -> int:
    """Calls per block; the calls made to find it are the warm-up."""
    for _ in range(warmup):
        fn()
    number = 1
    while True:
        taken = _timed_block(fn, device, number, clock, before)
        if taken >= BLOCK_S or number >= 1 << 16:
            return number
        number = max(number * 2, int(number * BLOCK_S / max(taken, 1e-9)) + 1)


def _timed_block(fn: Callable[[], Any], device: torch.device, number: int, clock: Callable[[], float],
                 before: Callable[[], Any] | None = None) -> float:
    """Seconds that ``number`` back-to-back calls of ``fn`` take, the device synchronised around them;
    with ``before``, the sum of the calls' own times, ``before`` running untimed ahead of each."""
    if before is not None:
        total = 0.0
        for _ in range(number):
            before()
            sync(device)
            start = clock()
            fn()
            sync(device)
            total += clock() - start
        return total
    sync(device)
    start = clock()
    for _ in range(number):
        fn()
    sync(device)
    return clock() - start


def _one_repetition(
    fn: Callable[[], Any], device: torch.device, number: int, min_run_time: float, clock: Callable[[], float],
    before: Callable[[], Any] | None = None,
) -> float:
    """Fastest block's time per call (ms), blocks of ``number`` calls run until ``min_run_time`` passed
    and at least ``MIN_BLOCKS`` blocks ran."""
    per_call, total = [], 0.0
    while total < min_run_time or len(per_call) < MIN_BLOCKS:
        taken = _timed_block(fn, device, number, clock, before)
        total += taken
        per_call.append(taken / number * 1e3)
    return min(per_call)


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    repetitions: int = DEFAULT_REPETITIONS,
    min_run_time: float = DEFAULT_MIN_RUN_TIME,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    before: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of every callable, one value per repetition (see the module doc)."""
    if repetitions < 1:
        raise ValueError(f"repetitions must be at least 1, got {repetitions}")
    names = list(fns)
    before = before or {}
    numbers = {name: _block_size(fns[name], device, warmup, clock, before.get(name)) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repetitions):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_one_repetition(fns[name], device, numbers[name], min_run_time, clock, before.get(name)))
    return times


def median_ms(per_repetition: list[float]) -> float:
    return statistics.median(per_repetition)


def fastest(times: dict[str, list[float]], names: list[str] | tuple[str, ...]) -> str:
    """The name among ``names`` with the smallest median time."""
    return min(names, key=lambda name: median_ms(times[name]))


def ratio_stats(candidate_ms: list[float], baseline_ms: list[float], digits: int = 3) -> dict[str, Any]:
    """Per-repetition ``candidate / baseline``: median, min (``low``), max (``high``), count."""
    ratios = [c / b for c, b in zip(candidate_ms, baseline_ms)]
    return {
        "median": round(statistics.median(ratios), digits),
        "low": round(min(ratios), digits),
        "high": round(max(ratios), digits),
        "repetitions": len(ratios),
    }


def format_ratio(median: float, low: float, high: float) -> str:
    """``0.52 ±0.03``: the median and the larger distance to either end of the range."""
    return f"{median:.2f} ±{max(high - median, median - low):.2f}"
