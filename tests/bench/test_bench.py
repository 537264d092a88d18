"""`bench` runs on CPU: a denoising step of the embedded default and tiny kernel shapes (ratios only;
no timing assertions, only structure, the spread's consistency and the memory bound)."""

import json
import time

import pytest
import torch

from qdlm_export.bench.kernels import run_kernel_benchmarks
from qdlm_export.bench.timing import interleaved_times, ratio_stats
from tests.cli_runner import run_cli


def test_bench_step_reports_ratios_and_memory(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--no-kernels", "--seqlen", "32", "--json")
    assert code == 0, err
    step = json.loads(out)["step"]
    assert step["dense_step_ms"] > 0 and step["quantized_step_ms"] > 0 and step["speedup"] > 0
    # W4 g128: packed codes + fp16 scales are about 4.1/16 of the bf16 bytes.
    assert step["linear_memory_ratio"] <= 0.3
    # the baseline is the fastest of the dense dtypes timed in the same run, with the ratio's spread
    assert set(step["dense_step_ms_by_dtype"]) == {"float32", "bfloat16"}
    assert step["dense_step_ms"] == min(step["dense_step_ms_by_dtype"].values())
    assert step["dense_dtype"] == min(step["dense_step_ms_by_dtype"], key=step["dense_step_ms_by_dtype"].get)
    assert step["repetitions"] == 5 and 0 < step["ratio_low"] <= step["ratio"] <= step["ratio_high"]
    assert step["speedup"] == pytest.approx(1 / step["ratio"], rel=0.01)


def test_kernel_benchmarks_cover_every_op_against_dense():
    result = run_kernel_benchmarks(quick=True, device="cpu", m_values=[3], shapes=[(256, 128)], repeat=1, warmup=0)
    ops = {r["op"] for r in result["results"]}
    assert ops == {"weight_only", "w8a8", "w4a4"}
    for r in result["results"]:
        assert r["dense_ms"] > 0 and r["time_ms"] > 0 and abs(r["ratio"] - r["time_ms"] / r["dense_ms"]) < 0.02 * r["ratio"] + 0.01
    assert "peers" not in result  # only on request


def test_a_backend_that_fails_is_reported_and_the_rest_still_timed(monkeypatch):
    """A kernel that does not compile on a device (first native run on a new GPU, say) costs its own
    rows only: they carry its error, and every other op is still measured against dense."""
    from qdlm_export import kernels
    from qdlm_export.bench.kernels import format_report

    real = kernels.packed_int_linear

    def no_compile(*args, **kwargs):
        if kwargs.get("bits") == 4:  # the W4A4 GEMM step (W8A8 runs the same op on 8-bit codes)
            raise RuntimeError("PassManager::run failed (stand-in)")
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "packed_int_linear", no_compile)
    result = run_kernel_benchmarks(device="cpu", m_values=[3], shapes=[(256, 128)], repeat=1, warmup=0,
                                   min_run_time=0.005)
    failed = [r for r in result["results"] if "error" in r]
    assert failed and {r["op"] for r in failed} == {"w4a4"}
    assert all("PassManager::run failed" in r["error"] and (r["K"], r["N"], r["M"]) == (256, 128, 3) for r in failed)
    timed = [r for r in result["results"] if "error" not in r]
    assert {r["op"] for r in timed} == {"weight_only", "w8a8"} and all(r["time_ms"] > 0 for r in timed)
    report = format_report(result)
    assert "w4a4" in report and "failed: RuntimeError: PassManager::run failed" in report


def test_kernel_rows_carry_the_fastest_dense_baseline_and_the_spread():
    result = run_kernel_benchmarks(device="cpu", m_values=[2, 5], shapes=[(256, 128)], repeat=3, min_run_time=0.005)
    assert result["repetitions"] == 3 and result["threads"] == 1
    for r in result["results"]:
        assert set(r["dense_ms_by_dtype"]) == {"float32", "bfloat16"}
        assert r["dense_ms"] == min(r["dense_ms_by_dtype"].values())
        assert r["repetitions"] == 3 and 0 < r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
    # exactly one backend per op and shape is the one `auto` runs
    for op in ("weight_only", "w8a8", "w4a4"):
        for m in (2, 5):
            assert sum(r["auto"] for r in result["results"] if r["op"] == op and r["M"] == m) == 1


def test_interleaved_times_alternate_and_the_ratio_is_per_repetition(monkeypatch):
    from qdlm_export.bench import timing

    monkeypatch.setattr(timing, "BLOCK_S", 0.0)  # one call per block: the call order is the round order
    monkeypatch.setattr(timing, "MIN_BLOCKS", 1)  # and one block per repetition
    order = []

    def sleeper(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)

        return call

    times = interleaved_times(
        {"base": sleeper("base", 0.004), "slow": sleeper("slow", 0.012)}, torch.device("cpu"),
        repetitions=4, min_run_time=0.0, warmup=0,
    )
    assert [len(v) for v in times.values()] == [4, 4]
    stats = ratio_stats(times["slow"], times["base"])
    assert stats["repetitions"] == 4 and stats["low"] <= stats["median"] <= stats["high"]
    assert 1.8 < stats["median"] < 4.5  # 3x by construction; sleeps overshoot on a busy machine
    # after the block sizing (one call each), every round times both, starting with each in turn
    assert order[2:] == ["base", "slow", "slow", "base", "base", "slow", "slow", "base"]


def test_each_repetition_keeps_the_fastest_of_at_least_min_blocks(monkeypatch):
    from qdlm_export.bench import timing

    monkeypatch.setattr(timing, "BLOCK_S", 0.0)
    durations = iter([0.030, 0.010, 0.020] * 2)  # a call slower than min_run_time: still three blocks
    calls = []

    def call():
        calls.append(1)
        time.sleep(next(durations))

    assert timing.MIN_BLOCKS == 3
    ms = timing._one_repetition(call, torch.device("cpu"), 1, 0.0, time.perf_counter)
    assert len(calls) == 3 and 9.5 <= ms < 20  # the 10 ms block, not the first (30 ms) one


def test_ratio_stats_pair_each_round():
    stats = ratio_stats([2.0, 4.0, 3.0], [1.0, 2.0, 1.0])  # drift doubles both in round 2: ratio stays 2
    assert stats == {"median": 2.0, "low": 2.0, "high": 3.0, "repetitions": 3}


def test_before_runs_untimed_ahead_of_every_timed_call(monkeypatch):
    """The cold-weight hook: each timed call follows its own ``before`` (not another candidate's), and
    the time ``before`` takes is not counted."""
    from qdlm_export.bench import timing

    monkeypatch.setattr(timing, "MIN_BLOCKS", 1)
    events = []

    def call(name):
        return lambda: (events.append(name), time.sleep(0.002))

    def slow_before(name):
        return lambda: (events.append(f"before {name}"), time.sleep(0.05))

    times = interleaved_times({"a": call("a"), "b": call("b")}, torch.device("cpu"), repetitions=2, min_run_time=0.0,
                              warmup=0, before={"a": slow_before("a")})
    assert all(2 <= t < 40 for t in times["a"]), times  # 2 ms calls; each 50 ms ``before`` left out
    for i, event in enumerate(events):
        if event == "a":
            assert events[i - 1] == "before a"
    assert "before b" not in events and events.count("before a") == events.count("a")


def test_eviction_keeps_the_values_and_the_cpu_run_says_weights_are_cold():
    from qdlm_export.kernels import cpu_native

    t = torch.randn(3000, 17)
    copy = t.clone()
    evicted = cpu_native.evict_from_caches([t, t[5:], torch.empty(0)])
    assert evicted == (cpu_native.library() is not None) and torch.equal(t, copy)
    result = run_kernel_benchmarks(device="cpu", m_values=[2], shapes=[(256, 128)], repeat=1, warmup=0,
                                   min_run_time=0.005)
    assert result["weights"].startswith("cold") == evicted


def test_quantized_ops_get_the_fastest_16_bit_activations_never_float32(monkeypatch):
    """float32 is a dense baseline candidate only: with one 16-bit dtype there is no probe (a float32
    that merely ties bf16 cannot take the quantized ops to the exact float32 path); with two, the
    probe times only them and takes the faster."""
    import qdlm_export.bench.kernels as K

    cpu = torch.device("cpu")
    x32 = torch.randn(3, 32)
    w = torch.randn(16, 32)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed although only one 16-bit dtype was timed")

    monkeypatch.setattr(K, "interleaved_times", no_probe)
    weights = {torch.float32: w, torch.bfloat16: w.to(torch.bfloat16)}
    assert K._activation_dtype(x32, weights, cpu, 0.01, time.perf_counter) == torch.bfloat16

    seen = []

    def probe(fns, *args, **kwargs):
        seen.append(set(fns))
        return {torch.bfloat16: [2.0], torch.float16: [1.0]}

    monkeypatch.setattr(K, "interleaved_times", probe)
    weights = {torch.float32: w, torch.bfloat16: w.to(torch.bfloat16), torch.float16: w.to(torch.float16)}
    assert K._activation_dtype(x32, weights, cpu, 0.01, time.perf_counter) == torch.float16
    assert seen == [{torch.bfloat16, torch.float16}]
