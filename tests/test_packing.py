"""Bit packing of codes (quanta._records.packing): round trips, exact layout, sizes and range checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta._records import packing
from quanta._records.packing import PackingError, pack_codes, packed_nbytes, unpack_codes


@st.composite
def code_tensors(draw):
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(lo, hi + 1, shape, generator=gen).to(torch.int8 if signed else torch.uint8)
    # Edge values always present somewhere when the tensor is big enough.
    flat = codes.reshape(-1)
    flat[0] = lo
    flat[-1] = hi
    return codes, bits, signed


@settings(max_examples=300, deadline=None)
@given(case=code_tensors())
def test_round_trip(case):
    codes, bits, signed = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(codes.numel(), bits)
    back = unpack_codes(packed, bits, tuple(codes.shape), signed)
    assert back.dtype == codes.dtype
    assert torch.equal(back, codes)


def _reference_pack(values: list[int], bits: int) -> bytes:
    """An obvious bit-by-bit packer: little-endian stream, least significant bit first."""
    stream = 0
    for i, v in enumerate(values):
        stream |= (v & ((1 << bits) - 1)) << (i * bits)
    return stream.to_bytes(packed_nbytes(len(values), bits), "little")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1000])
def test_layout_matches_bit_by_bit_reference(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n,), generator=gen).to(torch.int8)
    assert bytes(pack_codes(codes, bits).tolist()) == _reference_pack(codes.tolist(), bits)


def test_int4_is_two_codes_a_byte_low_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x0F, 0x07]
    signed = torch.tensor([-8, 7, -1], dtype=torch.int8)
    assert pack_codes(signed, 4).tolist() == [0x78, 0x0F]


def test_chunked_path_round_trips(monkeypatch):
    monkeypatch.setattr(packing, "_CHUNK", 24)
    for bits in (3, 4, 5, 8):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, 37), generator=torch.Generator().manual_seed(bits))
        codes = codes.to(torch.int8)
        packed = pack_codes(codes, bits)
        assert bytes(packed.tolist()) == _reference_pack(codes.reshape(-1).tolist(), bits)
        assert torch.equal(unpack_codes(packed, bits, (3, 37), True), codes)


def test_out_of_range_codes_are_refused_not_wrapped():
    with pytest.raises(PackingError, match="code 8 does not fit int4"):
        pack_codes(torch.tensor([0, 8], dtype=torch.int8), 4)
    with pytest.raises(PackingError, match="does not fit uint2"):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(PackingError, match="integer tensor"):
        pack_codes(torch.tensor([1.0]), 4)


def test_wrong_packed_size_is_refused():
    with pytest.raises(PackingError, match="do not hold 5 codes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, (5,), True)


def test_empty():
    assert pack_codes(torch.zeros(0, dtype=torch.int8), 4).numel() == 0
    assert unpack_codes(torch.zeros(0, dtype=torch.uint8), 4, (0, 3), True).shape == (0, 3)
