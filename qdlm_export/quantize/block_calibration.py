"""Calibration windows as a block-diffusion model (LLaDA2) sees them while it samples.

LLaDA2's published ``generate`` decodes ``block_length`` tokens at a time. Its forward gets a 4-D
additive attention mask in which a position of block ``i`` sees every position of blocks ``<= i``
(bidirectional inside a block, causal across blocks); at a step of block ``b`` the blocks before ``b``
hold clean (prompt or decoded) tokens and block ``b`` a mix of decoded and mask tokens, at least one
of them masked (the sampler stops a block when none is left).

A calibration window of ``seqlen`` tokens therefore draws, with the calibration seed, a current block
``b`` (uniform over the window's blocks) and a ratio ``t ~ U(0, 1]``: blocks before ``b`` stay clean,
``ceil(t * len(block b))`` positions of block ``b`` chosen at random become the mask token, and the
blocks after ``b`` are all mask tokens. Those later blocks are invisible to the earlier ones (the mask
is block-causal), so every position up to block ``b``'s end computes exactly what the sampler
computes; the published ``generate`` leaves the later blocks out of its forward instead, which would
give windows of different lengths (docs/calibration.md says what that changes).

The mask does not depend on the window: one ``[1, 1, seqlen, seqlen]`` tensor (0 where a position may
attend, the dtype's minimum elsewhere) serves every batch, expanded without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ATTENTION_PATTERNS = ("block-causal", "causal", "full")


def allowed_positions(pattern: str, seqlen: int, block_length: int | None = None) -> torch.Tensor | None:
    """``[seqlen, seqlen]`` booleans, True where query position ``i`` may attend to key position ``j``;
    None for ``full`` attention (no mask)."""
    if pattern == "full":
        return None
    position = torch.arange(seqlen)
    if pattern == "causal":
        return position[None, :] <= position[:, None]
    if pattern == "block-causal":
        if not block_length or block_length <= 0:
            raise ValueError("a block-causal mask needs a positive block length")
        block = position // block_length
        return block[None, :] <= block[:, None]
    raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {ATTENTION_PATTERNS}")


def attention_mask(pattern: str, seqlen: int, block_length: int | None = None, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The 4-D additive mask ``[1, 1, seqlen, seqlen]`` the model's forward takes for ``pattern`` (0 where
    attending is allowed, ``finfo(dtype).min`` elsewhere: no row is ever fully masked, since every
    position sees itself); None for ``full``."""
    allowed = allowed_positions(pattern, seqlen, block_length)
    if allowed is None:
        return None
    blocked = torch.full((seqlen, seqlen), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, torch.zeros((), dtype=dtype), blocked)[None, None].to(device)


@dataclass(frozen=True)
class BlockDraw:
    """What one window drew: its current block, the ratio ``t`` and how many positions of the block
    were masked."""

    block: int
    ratio: float
    masked: int


def mask_current_blocks(tokens: torch.Tensor, block_length: int, mask_token_id: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, list[BlockDraw]]:
    """``tokens [n, seqlen]`` masked the block-diffusion way (module docstring), with the draws made.
    Draws, in order from ``generator``: the current block of every window, the ratio of every window,
    then one random ordering of each window's current block."""
    n, seqlen = tokens.shape
    blocks = -(-seqlen // block_length)
    current = torch.randint(0, blocks, (n,), generator=generator)
    # (0, 1]: the sampler never runs a forward on a block without a mask left in it
    ratios = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64)
    masked = tokens.clone()
    draws = []
    for row, (b, t) in enumerate(zip(current.tolist(), ratios.tolist())):
        start, end = b * block_length, min(seqlen, (b + 1) * block_length)
        count = min(end - start, max(1, math.ceil(t * (end - start))))
        chosen = torch.randperm(end - start, generator=generator)[:count] + start
        masked[row, chosen] = mask_token_id
        masked[row, end:] = mask_token_id
        draws.append(BlockDraw(block=b, ratio=t, masked=count))
    return masked, draws
