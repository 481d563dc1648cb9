"""The oracle's own random numbers (fne_fast.ops.reference): Philox4x32-10 against Random123's known answers, and
Gumbel noise that keeps its far tail in float32 (docs/DESIGN.md §2). The kernels are checked against this oracle."""

from __future__ import annotations

import torch

from fne_fast.ops import reference

# Random123's known-answer vectors for Philox4x32-10: (key (lo, hi), counter, output words).
PHILOX_VECTORS = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answer_vectors():
    for key, counter, expected in PHILOX_VECTORS:
        assert tuple(int(word) for word in reference.philox4x32_10(counter, key)) == expected
    # A wrong key fails the same comparison.
    key, counter, expected = PHILOX_VECTORS[2]
    assert tuple(int(word) for word in reference.philox4x32_10(counter, (key[0] ^ 1, key[1]))) != expected


def test_gumbel_float32_keeps_the_far_tail():
    # x = 0 is v = 2⁻³³: G ≈ 22.87, where a float32 -log(-log u) would cap near 16.6 (docs/DESIGN.md §2).
    words = torch.tensor([0, 1, 2**20, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])
    in_float32 = reference.gumbel_from_bits(words, torch.float32).double()
    in_float64 = reference.gumbel_from_bits(words, torch.float64)
    torch.testing.assert_close(in_float32, in_float64, rtol=1e-6, atol=1e-6)
    assert in_float32[0] > 22.8
    v = (words.double() + 0.5) * 2.0**-32
    torch.testing.assert_close(in_float64, -torch.log(-torch.log1p(-v)), rtol=1e-12, atol=1e-12)
