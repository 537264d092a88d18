"""benchmarks/moe_flash_layer.py at a scaled-down shape: the folder it builds (shapes from the config
arithmetic of the published LLaDA2 code, bf16, shards + index) is accepted by ``qdlm-export quantize``
and the result by ``qdlm-export inspect``; its measurement row is consistent; ``--dry-run`` prints
the plan with the flash layer's arithmetic. The real measurement is not part of the suite."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "moe_flash_layer.py"

_spec = importlib.util.spec_from_file_location("moe_flash_layer", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up
_spec.loader.exec_module(bench)  # benchmarks/ is not a package

SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
         "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_shared_experts": 1, "n_group": 2, "topk_group": 1}


def _headers(folder: Path) -> dict[str, tuple[str, list[int], str]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        out.update({k: (v["dtype"], v["shape"], file.name) for k, v in header.items() if k != "__metadata__"})
    return out


def _expected_shapes(cfg: dict) -> dict[str, list[int]]:
    """The published LLaDA2 code's parameter shapes for a one-sparse-layer config (written out here,
    independently of the script)."""
    h, hd, heads, kv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    e_inter, vocab = cfg["moe_intermediate_size"], cfg["vocab_size"]
    p = "model.layers.0."
    shapes = {"model.word_embeddings.weight": [vocab, h], "model.norm.weight": [h], "lm_head.weight": [vocab, h],
              p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
              p + "attention.query_key_value.weight": [(heads + 2 * kv) * hd, h],
              p + "attention.query_layernorm.weight": [hd], p + "attention.key_layernorm.weight": [hd],
              p + "attention.dense.weight": [h, heads * hd],
              p + "mlp.gate.weight": [cfg["num_experts"], h], p + "mlp.gate.expert_bias": [cfg["num_experts"]]}
    mlps = {f"mlp.experts.{e}.": e_inter for e in range(cfg["num_experts"])}
    mlps["mlp.shared_experts."] = e_inter * cfg["num_shared_experts"]
    for sub, inter in mlps.items():
        shapes.update({p + sub + "gate_proj.weight": [inter, h], p + sub + "up_proj.weight": [inter, h],
                       p + sub + "down_proj.weight": [h, inter]})
    return shapes


def test_built_folder_has_the_requested_shapes_and_quantizes(tmp_path):
    shape = bench.Shape(**SMALL, intermediate_size=96, num_hidden_layers=4, first_k_dense_replace=1, vocab_size=4096)
    folder = bench.build_folder(tmp_path / "layer", shape, shard_bytes=200_000)  # several shards

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llada2_moe" and cfg["num_hidden_layers"] == 1 and cfg["first_k_dense_replace"] == 0
    assert {k: cfg[k] for k in SMALL} == SMALL
    headers = _headers(folder)
    expected = _expected_shapes(cfg)
    assert {k: v[1] for k, v in headers.items()} == expected
    assert {v[0] for v in headers.values()} == {"BF16"}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["weight_map"] == {k: v[2] for k, v in headers.items()}
    total = sum(2 * n for n in (_numel(s) for s in expected.values()))
    assert index["metadata"]["total_size"] == total

    # The same run the real measurement makes (child process, its own peak RSS), at group 32.
    args = Namespace(nsamples=2, seqlen=32, threads=1, group_size=32, margin_gb=0.0, min_available_gb=0.2)
    p = bench.plan(shape, vocab=cfg["vocab_size"])
    row = bench.run_method(folder, tmp_path / "q", "rtn", args, p)
    assert "failed" not in row and "skipped" not in row, row
    layer_bytes = sum(2 * _numel(s) for k, s in expected.items() if k.startswith("model.layers.0."))
    assert row["layer_bf16_bytes"] == layer_bytes
    # W4 g32, symmetric: 4-bit codes + an fp16 scale per 32 weights for every linear (plus a few bytes
    # of per-linear metadata); norms, the router and its bias keep their bf16 size.
    linear_params = sum(_numel(s) for k, s in expected.items() if k.endswith(
        ("_proj.weight", "query_key_value.weight", "attention.dense.weight")))
    packed = linear_params * (4 + 16 / 32) / 8 + (layer_bytes - 2 * linear_params)
    assert row["layer_packed_bytes"] == pytest.approx(packed, rel=0.02)
    assert row["packed_ratio"] == pytest.approx(row["layer_packed_bytes"] / layer_bytes, abs=1e-4)
    assert 0 < row["peak_rss_gb"] < 4 and row["s_per_expert"] * 9 == pytest.approx(row["layer_s"], abs=0.001)

    done = subprocess.run([str(Path(sys.executable).with_name("qdlm-export")), "inspect", str(tmp_path / "q"),
                           "--json", "--device", "cpu"], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    described = json.loads(done.stdout)
    assert described["valid"] is True and described["family"] == "llada2_moe"
    linears = {k.removesuffix(".weight"): s for k, s in expected.items() if k.endswith(
        ("_proj.weight", "query_key_value.weight", "attention.dense.weight"))}
    assert len(linears) == 3 * 9 + 2  # 8 experts and the shared one, q/k/v and the output projection
    assert set(described["quantized_modules"]) == set(linears)
    assert described["linear_params"] == sum(_numel(s) for s in linears.values())


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_dry_run_prints_the_flash_plan_and_builds_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--workdir", str(tmp_path / "w")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "w").exists()
    # The flash layer by hand: fused q/k/v (32 + 2*4 heads of 128), dense, router + bias, 2 norms, q/k
    # norms, 256 experts + 1 shared expert of 3 x 4096 x 1024.
    params = 40 * 128 * 4096 + 4096 * 4096 + 256 * 4096 + 256 + 2 * 4096 + 2 * 128 + 257 * 3 * 4096 * 1024
    assert f"{params:,} params" in done.stdout
    assert f"{params * 2 / 1e9:.2f} GB bf16" in done.stdout and f"{params * 4 / 1e9:.2f} GB float32" in done.stdout
    assert "dFactory" in done.stdout and "c29d72cc" in done.stdout
    for method in ("rtn", "gptq"):
        assert f"-m {method} --bits 4 --group-size 128" in done.stdout
    assert "--nsamples 8 --seqlen 256" in done.stdout
