"""The grouped expert GEMM (kernels/grouped_experts.py) against a float64 reference built here from the
codes: the torch backend and the Triton kernel (compiled on a GPU, else the CPU interpreter), with the
expert counts and top-k of real mixture-of-experts dLLMs (LLaDA2-mini: 256 experts, top-8; LLaDA-MoE:
64, top-8; small tests: 8, top-2), routing skewed the way trained routers are, and experts that no
token chose. Inputs are fresh random draws (seed printed; replay with QDLM_TEST_SEED)."""

from __future__ import annotations

import pytest
import torch

from qdlm_export.kernels import KernelBackendError, grouped_expert_gemm, select_backend
from qdlm_export.kernels.grouped_experts import grouped_expert_gemm_torch
from tests.kernel_inputs import DEV, needs_triton, random_packed_weight

# (bits, group_size, symmetric): W4 g32/g128 both ways, W8 grouped and per channel, and the odd widths
SCHEMES = [(4, 32, True), (4, 32, False), (4, 128, True), (4, 128, False), (8, 128, True), (8, -1, False),
           (3, 32, False), (2, 64, True)]
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 3e-5}


def skewed_routing(gen, tokens: int, experts: int, top_k: int, idle: int) -> torch.Tensor:
    """``[tokens, top_k]`` distinct experts per token: Zipf-like popularity (a few experts take most
    tokens) over a random order of the experts, and ``idle`` experts that no token chooses."""
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    popularity = popularity[torch.randperm(experts, generator=gen)]
    popularity[torch.randperm(experts, generator=gen)[:idle]] = 0.0
    return torch.multinomial(popularity.expand(tokens, experts), top_k, replacement=False, generator=gen)


def sorted_problem(gen, topk_ids: torch.Tensor, experts: int, k: int, dtype: torch.dtype):
    """The tokens as the op sees them: rows sorted by expert, and the experts' row offsets."""
    x = torch.randn(topk_ids.shape[0], k, generator=gen).to(dtype)
    order = topk_ids.reshape(-1).argsort(stable=True)
    counts = torch.bincount(topk_ids.reshape(-1), minlength=experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return x[order // topk_ids.shape[1]], offsets, counts


def stacked_weights(gen, experts, n_out, k, bits, group, symmetric, scale_dtype=torch.float16):
    """Per-expert codes, and their packed weights stacked as the loader stacks them."""
    parts = [random_packed_weight(gen, n_out, k, bits, group, symmetric, scale_dtype) for _ in range(experts)]
    codes = torch.stack([p[0] for p in parts])
    packed = torch.stack([p[1] for p in parts])
    scale = torch.stack([p[2] for p in parts])
    zero = None if symmetric else torch.stack([p[3] for p in parts])
    return codes, packed, scale, zero


def reference(x_sorted, offsets, codes, scale, zero, bits, group):
    """float64 ``x @ W[e].T`` for every row, with ``W[e] = (q - z) * s`` from the codes, and the
    rounding scale ``|x| @ |W[e]|.T``."""
    experts, n_out, k = codes.shape
    g = k if group == -1 else group
    z = zero.double() if zero is not None else torch.full(scale.shape, float(2 ** (bits - 1)), dtype=torch.float64)
    w = ((codes.double().view(experts, n_out, k // g, g) - z.unsqueeze(-1)) * scale.double().unsqueeze(-1))
    w = w.view(experts, n_out, k)
    expert_of_row = torch.repeat_interleave(torch.arange(experts), offsets.diff())
    x64 = x_sorted.double()
    y = torch.einsum("tk,tnk->tn", x64, w[expert_of_row])
    mag = torch.einsum("tk,tnk->tn", x64.abs(), w[expert_of_row].abs())
    return y, mag


def assert_close(y, ref, mag, rtol, what):
    assert torch.isfinite(y).all(), f"{what}: non-finite output (a row left unwritten?)"
    worst = ((y.double().cpu() - ref).abs() / (rtol * mag + 1e-30)).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the tolerance"


def _case(gen, experts, top_k, tokens, idle, n_out, k, scheme, dtype):
    bits, group, symmetric = scheme
    topk_ids = skewed_routing(gen, tokens, experts, top_k, idle)
    x, offsets, counts = sorted_problem(gen, topk_ids, experts, k, dtype)
    assert int((counts == 0).sum()) >= idle  # the idle experts really have no rows
    codes, packed, scale, zero = stacked_weights(gen, experts, n_out, k, bits, group, symmetric)
    return x, offsets, codes, packed, scale, zero


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("experts", "top_k", "tokens", "idle"), [(8, 2, 40, 3), (64, 8, 24, 20)])
def test_torch_backend_matches_float64(gen, scheme, experts, top_k, tokens, idle):
    k = 256 if scheme[1] in (-1, 128) else 192
    x, offsets, codes, packed, scale, zero = _case(gen, experts, top_k, tokens, idle, 48, k, scheme, torch.float32)
    y = grouped_expert_gemm_torch(x, offsets, packed, scale, zero, scheme[0], scheme[1], k)
    assert y.shape == (tokens * top_k, 48) and y.dtype == torch.float32
    assert_close(y, *reference(x, offsets, codes, scale, zero, scheme[0], scheme[1]), RTOL[torch.float32], "torch")


@needs_triton
@pytest.mark.parametrize("scheme", SCHEMES[:6])
@pytest.mark.parametrize(("experts", "top_k", "tokens", "idle"), [(8, 2, 20, 3), (64, 8, 6, 30)])
def test_triton_backend_matches_float64(gen, scheme, experts, top_k, tokens, idle):
    bits, group, _ = scheme
    k = 256 if group == 128 else 64 if group == 32 else 48  # per channel: K no block size divides
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x, offsets, codes, packed, scale, zero = _case(gen, experts, top_k, tokens, idle, 40, k, scheme, dtype)
        args = [t.to(DEV) if t is not None else None for t in (x, offsets, packed, scale, zero)]
        y = grouped_expert_gemm(*args, bits, group, k, backend="triton")
        assert y.dtype == dtype and y.shape == (tokens * top_k, 40)
        assert_close(y, *reference(x, offsets, codes, scale, zero, bits, group), RTOL[dtype], f"triton {dtype}")


@needs_triton
def test_triton_one_expert_takes_every_token_and_rows_span_many_tiles(gen):
    """The extreme skew: one expert has all rows (several row tiles), every other expert none."""
    experts, k, n_out, rows = 8, 64, 72, 50
    codes, packed, scale, zero = stacked_weights(gen, experts, n_out, k, 4, 32, False)
    x = torch.randn(rows, k, generator=gen)
    hot = int(torch.randint(0, experts, (1,), generator=gen))
    counts = torch.zeros(experts, dtype=torch.int64)
    counts[hot] = rows
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    args = [t.to(DEV) for t in (x, offsets, packed, scale, zero)]
    y = grouped_expert_gemm(*args, 4, 32, k, backend="triton")
    assert_close(y, *reference(x, offsets, codes, scale, zero, 4, 32), RTOL[torch.float32], "one hot expert")


@needs_triton
def test_no_rows_at_all(gen):
    _, packed, scale, _ = stacked_weights(gen, 4, 32, 64, 4, 32, True)
    x, offsets, packed, scale = (t.to(DEV) for t in (torch.empty(0, 64), torch.zeros(5, dtype=torch.int64),
                                                     packed, scale))
    for backend in ("torch", "triton"):
        assert grouped_expert_gemm(x, offsets, packed, scale, None, 4, 32, 64, backend=backend).shape == (0, 32)


def test_torch_backend_refuses_offsets_that_do_not_cover_the_rows(gen):
    _, packed, scale, _ = stacked_weights(gen, 4, 32, 64, 4, 32, True)
    x = torch.randn(10, 64, generator=gen)
    with pytest.raises(ValueError, match="offsets must rise"):
        grouped_expert_gemm_torch(x, torch.tensor([0, 4, 3, 8, 10]), packed, scale, None, 4, 32, 64)
    with pytest.raises(ValueError, match="offsets must rise"):
        grouped_expert_gemm_torch(x, torch.tensor([0, 4, 5, 8, 9]), packed, scale, None, 4, 32, 64)
    with pytest.raises(ValueError, match="offsets must be integer"):
        grouped_expert_gemm_torch(x, torch.tensor([0, 4, 10]), packed, scale, None, 4, 32, 64)


def test_backend_choice():
    """auto runs torch on the CPU; Triton is refused for a group size it cannot tile, with the reason."""
    assert select_backend("grouped_expert_gemm", "cpu", K=64, N=32, bits=4, group_size=32,
                          dtype=torch.float32).name == "torch"
    # on DEV: on a GPU machine, CPU tensors would be refused first (Triton needs CUDA there)
    with pytest.raises(KernelBackendError, match="group_size 24"):
        select_backend("grouped_expert_gemm", DEV, backend="triton", K=96, N=32, bits=4, group_size=24,
                       dtype=torch.float32)
