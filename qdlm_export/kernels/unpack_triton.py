"""Codes out of the packed int32 words (``core/packing.py``), inside Triton kernels: what every
quantized GEMM kernel (weight-only, grouped experts, packed-int W4A4, the one-pass dequantization)
reads its weight tile with.

Code ``k`` of a row sits at stream bit ``k * bits``: word ``(k * bits) // 32``, shift
``(k * bits) % 32``. For 2/4/8 bits the code is whole inside that word; for 3 bits, 32 codes fill a
word triple, and codes 10 and 21 straddle into the next word. Words are read as uint32 so that
``>>`` is a logical shift.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _code(w0, w1, w2, C: tl.constexpr, BITS: tl.constexpr):
    """Code ``C`` of a word (2/4/8 bits: ``w0``) or of a word triple (3 bits: 32 codes, stream bit
    ``3 C``; codes 10 and 21 straddle into the next word)."""
    if BITS != 3:
        return (w0 >> C * BITS) & ((1 << BITS) - 1)
    elif C < 10:
        return (w0 >> 3 * C) & 7
    elif C == 10:
        return ((w0 >> 30) | (w1 << 2)) & 7
    elif C < 21:
        return (w1 >> 3 * C - 32) & 7
    elif C == 21:
        return ((w1 >> 31) | (w2 << 1)) & 7
    else:
        return (w2 >> 3 * C - 64) & 7


# Codes FIRST, FIRST + STRIDE, ... of every word (or word triple), joined on new trailing dims of size
# 2: tl.join keeps a new dim inside the thread that holds the word, so splitting a word costs its
# shifts and masks once, in one thread, and flattening the joined dims back into K moves no data.
# The innermost join picks between codes STRIDE apart, each outer one between halves: element
# [..., a, b] of _codes4 is code 2a + b, so flattening gives the codes in order. (Broadcasting the
# words against a vector of shifts instead put one code per lane: 8 lanes loaded each word, and the
# codes went through shared memory to the MMA's layout.)
@triton.jit
def _codes2(w0, w1, w2, FIRST: tl.constexpr, STRIDE: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_code(w0, w1, w2, FIRST, BITS), _code(w0, w1, w2, FIRST + STRIDE, BITS))


@triton.jit
def _codes4(w0, w1, w2, FIRST: tl.constexpr, STRIDE: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_codes2(w0, w1, w2, FIRST, 2 * STRIDE, BITS), _codes2(w0, w1, w2, FIRST + STRIDE, 2 * STRIDE, BITS))


@triton.jit
def _codes8(w0, w1, w2, FIRST: tl.constexpr, STRIDE: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_codes4(w0, w1, w2, FIRST, 2 * STRIDE, BITS), _codes4(w0, w1, w2, FIRST + STRIDE, 2 * STRIDE, BITS))


@triton.jit
def _codes16(w0, w1, w2, FIRST: tl.constexpr, STRIDE: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_codes8(w0, w1, w2, FIRST, 2 * STRIDE, BITS), _codes8(w0, w1, w2, FIRST + STRIDE, 2 * STRIDE, BITS))


@triton.jit
def split_words(words, BITS: tl.constexpr):
    """``[R, W]`` uint32 words -> ``[R, W * 32 // BITS]`` codes in stream order (2, 4 or 8 bits)."""
    if BITS == 8:
        q = _codes4(words, words, words, 0, 1, BITS)
    elif BITS == 4:
        q = _codes8(words, words, words, 0, 1, BITS)
    else:
        q = _codes16(words, words, words, 0, 1, BITS)
    return tl.reshape(q, (words.shape[0], words.shape[1] * (32 // BITS)))


@triton.jit
def split_triples(w0, w1, w2):
    """3-bit codes: ``[R, T]`` uint32 words 0, 1 and 2 of each triple -> ``[R, 32 T]`` codes in order."""
    q = tl.join(_codes16(w0, w1, w2, 0, 2, 3), _codes16(w0, w1, w2, 1, 2, 3))
    return tl.reshape(q, (w0.shape[0], w0.shape[1] * 32))


@triton.jit
def unpack_code_rows(wp_ptr, stride_wn, k0, offs_n, K, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``q[n, k0 + j]`` (int32, ``[BLOCK_N, BLOCK_K]``) of the packed rows ``offs_n``; 0 outside.

    2/4/8 bits: each thread reads whole words along a row (``BLOCK_K * BITS / 32`` per row, adjacent in
    memory) and splits every word into its ``32 / BITS`` codes; ``k0`` is a multiple of ``BLOCK_K``,
    itself a multiple of the codes per word, so the tile starts on a word. Reading code by code
    instead (one load per code, ``32 / BITS`` of them hitting the same word) made the kernel 10-40x
    slower than dense on an H200.

    3 bits: 32 codes fill 3 words, read as word triples (codes 10 and 21 straddle into the next word).
    A ``BLOCK_K`` of 16 keeps a per-code gather of two words a code (336 KiB of shared memory at the
    64 x 128 tiles that an H100 then could not launch).
    """
    if 32 % BITS == 0:
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        widx = k0 // PER_WORD + tl.arange(0, WORDS)
        ok = (offs_n[:, None] < N) & (widx[None, :] < tl.cdiv(K, PER_WORD))
        words = tl.load(wp_ptr + offs_n[:, None] * stride_wn + widx[None, :], mask=ok, other=0)
        return split_words(words.to(tl.uint32, bitcast=True), BITS).to(tl.int32)
    elif BLOCK_K % 32 == 0:
        TRIPLES: tl.constexpr = BLOCK_K // 32
        first = (k0 // 32) * 3 + tl.arange(0, TRIPLES) * 3  # word 0 of each triple; k0 % 32 == 0
        row_words = tl.cdiv(K * BITS, 32)
        n_ok = offs_n[:, None] < N
        ptrs = wp_ptr + offs_n[:, None] * stride_wn + first[None, :]
        w0 = tl.load(ptrs, mask=n_ok & (first[None, :] < row_words), other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(ptrs + 1, mask=n_ok & (first[None, :] + 1 < row_words), other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(ptrs + 2, mask=n_ok & (first[None, :] + 2 < row_words), other=0).to(tl.uint32, bitcast=True)
        return split_triples(w0, w1, w2).to(tl.int32)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        bit = offs_k * BITS  # stream position of code k inside its row
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        inside = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        ptrs = wp_ptr + offs_n[:, None] * stride_wn + word[None, :]
        q = tl.load(ptrs, mask=inside, other=0).to(tl.uint32, bitcast=True) >> shift[None, :]
        # A code at shift 30 or 31 straddles: its high bits are the low bits of the next word.
        straddles = (shift + BITS) > 32
        nxt = tl.load(ptrs + 1, mask=inside & straddles[None, :], other=0).to(tl.uint32, bitcast=True)
        # (32 - shift) % 32 keeps the shift amount legal; nxt is 0 wherever the code does not straddle.
        q = q | (nxt << ((32 - shift) % 32)[None, :])
        return (q & ((1 << BITS) - 1)).to(tl.int32)
