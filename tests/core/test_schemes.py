"""RTN arithmetic against float64 formulas written independently of the implementation."""

import pytest
import torch

from qdlm_export.core.schemes import WeightScheme, dequantize, quantize_rtn


def reference_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Fake-quantized weight in float64, group by group, with plain loops. Also returns where
    ``w/scale`` sits on a rounding tie (x.5), where float32 and float64 may legitimately differ."""
    w = w.double()
    out, inp = w.shape
    group = inp if group == -1 else group
    result = torch.empty_like(w)
    tie = torch.zeros_like(w, dtype=torch.bool)
    maxq = 2**bits - 1
    for g in range(inp // group):
        blk = w[:, g * group : (g + 1) * group]
        lo = blk.min(dim=1).values.clamp(max=0)
        hi = blk.max(dim=1).values.clamp(min=0)
        if symmetric:
            scale = torch.maximum(lo.abs(), hi) / (maxq / 2)
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / scale).clamp(0, maxq)
        ratio = blk / scale[:, None]
        tie[:, g * group : (g + 1) * group] = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4
        q = (torch.round(ratio) + zero[:, None]).clamp(0, maxq)
        result[:, g * group : (g + 1) * group] = (q - zero[:, None]) * scale[:, None]
    return result, tie


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_float64_reference(bits, group, symmetric):
    w = torch.randn(48, 256) * torch.rand(48, 1) * 0.1
    qw = quantize_rtn(w, WeightScheme(bits, group, symmetric))
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    assert (qw.zero_point is None) == symmetric
    ref, tie = reference_rtn(w, bits, group, symmetric)
    got = qw.dequantize(torch.float64)
    # Identical everywhere except on exact rounding ties, where float32 and float64 may pick sides.
    mismatch = ((got - ref).abs() > 1e-6 * ref.abs().max()) & ~tie
    assert not mismatch.any(), f"{int(mismatch.sum())} codes differ from the float64 reference"
    # And the error is what a b-bit grid can give: at most half a step per element.
    step = (w.abs().max() * 2 / (2**bits - 1)).item()
    assert (got - w.double()).abs().max().item() <= step * 0.51 + 1e-6


def test_zero_group_is_exact_and_dequantize_matches_formula():
    w = torch.randn(4, 64)
    w[1] = 0.0
    qw = quantize_rtn(w, WeightScheme(4, 32, False))
    dq = dequantize(qw.codes, qw.scale, qw.zero_point, qw.scheme, torch.float64)
    assert torch.equal(dq[1], torch.zeros(64, dtype=torch.float64))
    manual = (qw.codes.double().view(4, 2, 32) - qw.zero_point.double()[..., None]) * qw.scale.double()[..., None]
    assert torch.allclose(dq, manual.view(4, 64))


def test_more_bits_means_less_error():
    w = torch.randn(64, 256)
    errors = [(quantize_rtn(w, WeightScheme(b, 128, True)).dequantize() - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
