"""`bench --peers`: torchao's int4 weight-only and int8 dynamic linears beside ours, from the same float
weights. With torchao: finite ratios, and every output checked against float64 references. Without it
(its import blocked in a subprocess): a skip line, exit 0, and ``"peers": null`` with the reason."""

import json
import math
import subprocess
import sys

import pytest
import torch

from qdlm_export import kernels as D
from qdlm_export.bench.kernels import quantized_weights
from tests.cli_runner import run_cli

TINY = ("--no-step", "--shape", "256x128", "--m", "3", "--repetitions", "2")


def _float64_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


def test_peers_time_both_torchao_paths(monkeypatch, capsys):
    pytest.importorskip("torchao")
    code, out, err = run_cli(monkeypatch, capsys, "bench", *TINY, "--peers", "--json")
    assert code == 0, err
    peers = json.loads(out)["peers"]
    assert peers["library"] == "torchao" and peers["version"]
    rows = {r["peer"]: r for r in peers["rows"]}
    assert set(rows) == {"int4_weight_only", "int8_dynamic"}
    for r in rows.values():
        assert "error" not in r, r
        for key in ("ratio", "ours_over_peer", "time_ms", "our_time_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["ours_over_peer_low"] <= r["ours_over_peer"] <= r["ours_over_peer_high"] and r["repetitions"] == 2
    assert rows["int4_weight_only"]["our_op"] == "weight_only" and rows["int8_dynamic"]["our_op"] == "w8a8"


def test_peer_outputs_agree_with_ours_and_with_float64_references():
    pytest.importorskip("torchao")
    from qdlm_export.bench.peers import build_peers

    gen = torch.Generator().manual_seed(11)
    k, n, m = 256, 128, 5
    w32 = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    to_float = x.double() @ w32.double().T  # the product with the weight both quantize from
    peers = build_peers(w32, torch.bfloat16)
    ours_w = quantized_weights(w32, 4, 128, torch.device("cpu"))
    packed, scale = ours_w["weight_only"]
    w8, s8 = ours_w["w8a8"]  # packed symmetric 8-bit codes, as a W8A8 checkpoint holds them
    with torch.no_grad():
        ours = {
            "int4_weight_only": D.weight_only_linear(x, packed, scale, None, 4, 128, k),
            "int8_dynamic": D.w4a4_linear(x, w8, s8, None, -1, k, bits=8, act_bits=8),
        }
        our_dequantized = {
            "int4_weight_only": D.dequantize_packed(packed, scale, None, 4, 128, k, torch.float64),
            "int8_dynamic": D.dequantize_packed(w8, s8, None, 8, -1, k, torch.float64),
        }
        # own bound: bf16 output rounding (int8: plus the int8 activation rounding, ~0.8 %)
        for name, own_bound, quant_bound in (("int4_weight_only", 0.01, 0.15), ("int8_dynamic", 0.015, 0.03)):
            module = peers[name]["module"]
            theirs = module(x)
            # torchao keeps its dequantized weight opaque: one-hot rows read it back (exact for both
            # kernels up to bf16 output rounding: a one-hot row quantizes to one full-scale code)
            their_dequantized = module(torch.eye(k, dtype=torch.bfloat16)).double().T
            # each kernel against the float64 product with its own dequantized weight
            assert _float64_error(ours[name], x.double() @ our_dequantized[name].T) < own_bound
            assert _float64_error(theirs, x.double() @ their_dequantized.T) < own_bound
            # both against the float weight: the scheme's own quantization error, of the same size
            err_ours, err_theirs = _float64_error(ours[name], to_float), _float64_error(theirs, to_float)
            assert 0 < err_ours < quant_bound and 0 < err_theirs < quant_bound, (name, err_ours, err_theirs)
            assert _float64_error(ours[name], theirs.double()) < 2 * quant_bound


BLOCKED = "import sys; sys.modules['torchao'] = None; from qdlm_export.cli.app import main; sys.argv[0] = 'qdlm-export'; main()"


@pytest.mark.parametrize("as_json", [False, True])
def test_without_torchao_peers_are_skipped_with_the_reason(as_json):
    args = [sys.executable, "-c", BLOCKED, "bench", *TINY, "--peers"] + (["--json"] if as_json else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if as_json:
        result = json.loads(done.stdout)
        assert result["peers"] is None and "torchao is not installed" in result["peers_skipped"]
        assert result["kernels"]["results"]  # our kernels were still timed
    else:
        assert "peers skipped: torchao is not installed (pip install torchao)" in done.stdout + done.stderr
