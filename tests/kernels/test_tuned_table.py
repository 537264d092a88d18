"""Tuned kernel tables (``kernels/tuned.py``): what the tile sweep measured on a GPU model, read back.

No GPU here: the device name is set by the test and the table written into a temporary folder; the
lookups, the launchers' configs and ``auto``'s measured preference are what a CUDA call would see.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qdlm_export.kernels import registry, tuned

CUDA = torch.device("cuda", 0)


TILES = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)


def wo(M, K, N, backend="triton", **config):
    """A weight-only entry; a Triton one's tile configuration is TILES with ``config`` over it."""
    return {"op": "weight_only", "K": K, "N": N, "M": M, "backend": backend,
            "config": {**TILES, **config} if backend == "triton" else None}


@pytest.fixture
def gpu_named(monkeypatch, tmp_path):
    """``write(entries)`` puts a table for the fake GPU "NVIDIA Test-GPU 80GB" in a temporary folder;
    CUDA looks available and device 0 has that name."""
    monkeypatch.setattr(tuned, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA Test-GPU 80GB")
    tuned.forget()
    registry.forget_selections()

    def write(entries, text=None):
        path = tmp_path / tuned.table_name("NVIDIA Test-GPU 80GB")
        path.write_text(text if text is not None else json.dumps({"device": "NVIDIA Test-GPU 80GB", "entries": entries}))
        tuned.forget()
        registry.forget_selections()
        return path

    yield write
    tuned.forget()
    registry.forget_selections()


def test_table_name_is_the_device_name_made_a_file_name():
    assert tuned.table_name("NVIDIA H200") == "nvidia-h200.json"
    assert tuned.table_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3.json"


def test_the_entry_at_the_nearest_shape_and_the_covering_token_count(gpu_named):
    gpu_named([wo(16, 4096, 4096, BLOCK_M=16), wo(1024, 4096, 4096, BLOCK_M=128), wo(16, 4096, 12288, BLOCK_M=32),
               {"op": "int8", "K": 4096, "N": 4096, "M": 16, "backend": "triton", "config": {**TILES, "BLOCK_M": 64}}])
    pick = lambda m, n, k, op="weight_only": tuned.entry(op, m, n, k, CUDA)  # noqa: E731
    assert pick(1, 4096, 4096)["config"]["BLOCK_M"] == 16  # smallest measured M at or above
    assert pick(16, 4096, 4096)["config"]["BLOCK_M"] == 16
    assert pick(17, 4096, 4096)["config"]["BLOCK_M"] == 128
    assert pick(8192, 4096, 4096)["config"]["BLOCK_M"] == 128  # above every measured M: the largest
    assert pick(4, 11008, 4096)["config"]["BLOCK_M"] == 32  # N 11008 is nearest 12288 (log scale)
    assert pick(4, 4096, 4096, "int8")["config"]["BLOCK_M"] == 64  # each op its own entries
    assert pick(4, 4096, 4096, "w4a4") is None
    assert tuned.entry("weight_only", 16, 4096, 4096, torch.device("cpu")) is None  # CUDA only


def test_no_table_or_a_broken_one_leaves_the_heuristics(gpu_named):
    assert tuned.entry("weight_only", 16, 4096, 4096, CUDA) is None  # no file for this GPU
    path = gpu_named(None, text="{not json")
    with pytest.warns(UserWarning, match=f"ignoring the tuned kernel table {path}"):
        assert tuned.entry("weight_only", 16, 4096, 4096, CUDA) is None
    for bad in ({"op": "weight_only", "K": 4096, "N": 4096, "M": 16, "backend": "magic"},
                {**wo(16, 4096, 4096), "config": {"BLOCK_M": 16, "BLOCK_N": 32}},  # no BLOCK_K, warps, stages
                wo(16, 4096, 4096, TURBO=True),  # a key no launcher takes
                {**wo(16, 4096, 4096, backend="triton_dequant"), "config": TILES}):  # tiles for cuBLAS?
        gpu_named([bad])
        with pytest.warns(UserWarning, match="unknown values or tile keys"):
            assert tuned.entry("weight_only", 16, 4096, 4096, CUDA) is None


def test_launchers_take_the_measured_tiles_fitted_to_the_group(gpu_named, monkeypatch):
    pytest.importorskip("triton", reason="the launcher module imports triton")
    from qdlm_export.kernels import weight_only_triton
    from qdlm_export.kernels.weight_only_triton import launch_config, pick_config

    monkeypatch.setattr(weight_only_triton, "cuda_arch", lambda device=None: 90)  # the heuristic asks the GPU

    gpu_named([wo(16, 4096, 4096, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=4,
                  SWAP_AB=True)])
    assert launch_config(16, 4096, -1, 4096, 4, type("X", (), {"device": CUDA, "dtype": torch.bfloat16})()) == \
        pick_config(16, 4096, -1, 4096, CUDA)  # per channel: not what the sweep measured
    cuda_x = type("X", (), {"device": CUDA, "dtype": torch.bfloat16})()  # only its device and dtype are read
    cfg = launch_config(16, 4096, 64, 4096, 4, cuda_x)
    assert cfg["BLOCK_N"] == 128 and cfg["SPLIT_K"] == 4 and cfg["SWAP_AB"] and cfg["GROUP_M"] == 8
    assert cfg["BLOCK_K"] == 64  # a 64-wide group: the K step stays inside it
    # what the sweep did not measure keeps the heuristic: 8-bit codes, float32 activations
    assert launch_config(16, 4096, 128, 4096, 8, cuda_x) == pick_config(16, 4096, 128, 4096, CUDA)
    f32_x = type("X", (), {"device": CUDA, "dtype": torch.float32})()
    assert launch_config(16, 4096, 128, 4096, 4, f32_x) == pick_config(16, 4096, 128, 4096, CUDA)


def test_auto_tries_the_backend_measured_fastest_first(gpu_named):
    """A measured preference for the one-pass dequantization at 16 tokens overrides the token-count rule
    (fused kernel up to 2048 tokens), where that backend can run; elsewhere the rule stands."""
    pytest.importorskip("triton", reason="the Triton backends' availability is what is chosen between")
    from qdlm_export.kernels import weight_only  # noqa: F401 - registers the op and its preference

    facts = dict(K=4096, N=4096, bits=4, group_size=128, symmetric=True, dtype=torch.bfloat16)
    unavailable = registry.select_backend("weight_only_linear", CUDA, M=16, **facts)
    if unavailable.name == "torch":
        pytest.skip("the Triton backends cannot run on this CUDA stand-in (triton without a CUDA driver)")
    assert unavailable.name == "triton"
    gpu_named([wo(16, 4096, 4096, backend="triton_dequant")])
    assert registry.select_backend("weight_only_linear", CUDA, M=16, **facts).name == "triton_dequant"
    assert "triton_dequant was measured faster here" in registry.describe_backend("weight_only_linear", CUDA, M=16, **facts)
    assert registry.select_backend("weight_only_linear", CUDA, M=16, **{**facts, "bits": 8}).name == "triton"
    # tinygemm would hold a second copy of the weight: measured fastest, it is still not picked by auto
    gpu_named([wo(16, 4096, 4096, backend="cuda_tinygemm")])
    assert registry.select_backend("weight_only_linear", CUDA, M=16, **facts).name == "triton"


@pytest.mark.parametrize("op", ["weight_only", "int8", "w4a4"])
def test_what_the_sweep_records_launches(gpu_named, op):
    """A table entry made by the sweep's own writer (its configs leave GROUP_M out) runs its kernel, in
    the interpreter here, with the torch backend's result."""
    pytest.importorskip("triton", reason="the kernels run in Triton's interpreter")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import triton_sweep

    from qdlm_export.kernels import int8 as int8_ops
    from qdlm_export.kernels import int8_triton, weight_only, weight_only_triton
    from tests.kernel_inputs import DEV, random_packed_weight

    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, **(
        {"SPLIT_K": 2, "SWAP_AB": True, "OFFSET_CODES": False} if op == "weight_only" else {}))
    row = {"op": op, "K": 128, "N": 48, "M": 16, "candidates": [
        {"name": "heuristic", "config": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
         "graph_ms": 2.0, "rel_err_vs_torch": 0.001, "vs_dense": 0.5},
        {"name": str(tuple(tiles.values())), "config": tiles, "graph_ms": 1.0, "rel_err_vs_torch": 0.001, "vs_dense": 1.0}]}
    gpu_named(triton_sweep.table_entries([row]))
    cfg = tuned.tile_config(op, 5, 48, 128, CUDA)
    assert {k: cfg[k] for k in tiles} == tiles and cfg["GROUP_M"] == 8
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 128, generator=gen).to(DEV, torch.bfloat16)
    if op == "weight_only":
        _, packed, scale, _ = random_packed_weight(gen, 48, 128, 4, 32, True, torch.bfloat16)
        packed, scale = packed.to(DEV), scale.to(DEV)
        y = weight_only_triton.weight_only_linear_triton(x, packed, scale, None, 4, 32, 128, config=cfg)
        ref = weight_only.weight_only_linear_torch(x, packed, scale, None, 4, 32, 128)
    else:
        bits = 8 if op == "int8" else 4
        _, packed, scale, _ = random_packed_weight(gen, 48, 128, bits, -1, True, torch.float32)
        packed, scale = packed.to(DEV), scale.to(DEV)
        xq, xs = int8_ops.quantize_per_token_torch(x, bits)
        y = int8_triton.packed_int_linear_triton(xq, xs, packed, scale, None, bits, -1, 128, config=cfg)
        ref = int8_ops.packed_int_linear_torch(xq, xs, packed, scale, None, bits, -1, 128)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
