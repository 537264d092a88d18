"""Packing layout against an independent bit-by-bit reference, at every bit width with odd shapes."""

import pytest
import torch

from qdlm_export.core.packing import SUPPORTED_BITS, pack_rows, packed_words, unpack_rows


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The spec, written out literally: code j of a row occupies stream bits [j*bits, (j+1)*bits);
    stream bit t is bit t%32 of word t//32."""
    rows, cols = codes.shape
    words = [[0] * packed_words(cols, bits) for _ in range(rows)]
    for r in range(rows):
        for j in range(cols):
            value = int(codes[r, j])
            for b in range(bits):
                if (value >> b) & 1:
                    t = j * bits + b
                    words[r][t // 32] |= 1 << (t % 32)
    signed = [[w - (1 << 32) if w >= (1 << 31) else w for w in row] for row in words]
    return torch.tensor(signed, dtype=torch.int32).reshape(rows, -1)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (2, 96), (4, 129), (7, 300), (3, 256)])  # whole words too
def test_pack_matches_reference_and_round_trips(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.int64)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], (shape[1] * bits + 31) // 32)
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(unpack_rows(packed, bits, shape[1]).to(torch.int64), codes)


def test_all_ones_codes_fill_every_bit():
    # 32 codes of 3 bits = 96 bits = exactly 3 words, all ones -> every word is -1.
    packed = pack_rows(torch.full((2, 32), 7), 3)
    assert packed.shape == (2, 3) and bool((packed == -1).all())


def test_rejects_out_of_range_codes_and_wrong_word_count():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_rows(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_rows(torch.zeros(1, 2, dtype=torch.int32), 4, 8)
