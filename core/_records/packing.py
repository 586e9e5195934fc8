"""Bit packing of integer codes: ``bits`` (2..8) per code, no padding between codes.

Codes are laid out as one little-endian bit stream: code ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, least significant bit first. For int4 that is two codes a
byte, the first in the low nibble; for 8 bits it is the bytes themselves. Signed codes are
stored as their low ``bits`` bits (two's complement) and sign-extended when unpacked.
Everything is vectorised in torch and works in chunks, so packing a large weight needs only
a bounded amount of scratch memory.
"""

from __future__ import annotations

import math

import torch

from quanta.errors import QuantaError

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes", "PackingError"]

# Codes per chunk: a multiple of 8 so that every chunk starts on a byte boundary for any bits.
_CHUNK = 1 << 22


class PackingError(QuantaError, ValueError):
    """Codes cannot be packed or unpacked as asked (out of range for ``bits``, wrong size)."""


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take packed: ``ceil(numel * bits / 8)``."""
    return math.ceil(numel * bits / 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PackingError(f"bits must be an integer in 1..8, got {bits!r}")


def _pack_chunk(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``values``: int64 ``[n]`` in ``[0, 2**bits)``, ``n`` a multiple of 8 -> uint8 ``[n * bits // 8]``."""
    if bits == 8:
        return values.to(torch.uint8)
    if bits == 4:
        pairs = values.to(torch.uint8).reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    # Eight codes make exactly ``bits`` bytes: gather them into one int64 word (<= 64 bits), split it.
    groups = values.reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (groups << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_chunk(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_chunk`: uint8 ``[m * bits]`` -> int64 ``[m * 8]`` in ``[0, 2**bits)``."""
    if bits == 8:
        return packed.to(torch.int64)
    if bits == 4:
        p = packed.to(torch.int64)
        return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)
    groups = packed.to(torch.int64).reshape(-1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    return ((words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool | None = None) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, any integer dtype) into a flat uint8 tensor.

    Returns ``[packed_nbytes(codes.numel(), bits)]`` uint8 on the CPU. ``signed`` (default: the
    codes' dtype is signed) sets the range checked: ``[-2**(bits-1), 2**(bits-1))`` or
    ``[0, 2**bits)``; a code outside it raises :class:`PackingError` instead of being wrapped.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise PackingError(f"codes must be an integer tensor, got {codes.dtype}")
    if signed is None:
        signed = codes.dtype.is_signed
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    flat = codes.detach().reshape(-1).cpu()
    n = flat.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    mask = (1 << bits) - 1
    byte_codes = flat.dtype in (torch.int8, torch.uint8)
    for start in range(0, n, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if chunk.numel():
            cmin, cmax = torch.aminmax(chunk)
            if int(cmin) < lo or int(cmax) > hi:
                bad = chunk[(chunk < lo) | (chunk > hi)][0]
                raise PackingError(f"code {int(bad)} does not fit {'' if signed else 'u'}int{bits} (range {lo}..{hi})")
        first = start * bits // 8
        if byte_codes and bits in (4, 8):
            # Fast paths on bytes: two's complement bits are the code's low bits.
            u = chunk.view(torch.uint8) if chunk.dtype == torch.int8 else chunk
            if bits == 8:
                out[first:first + u.numel()] = u
                continue
            if u.numel() % 2:
                u = torch.cat([u, u.new_zeros(1)])
            # The high code's upper bits fall off the byte in the shift; only the low one needs a mask.
            packed = (u[0::2] & 0xF) | (u[1::2] << 4)
        else:
            chunk = chunk.to(torch.int64)
            pad = (-chunk.numel()) % 8
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad)])
            packed = _pack_chunk(chunk & mask, bits)
        take = min(packed.numel(), out.numel() - first)
        out[first:first + take] = packed[:take]
    return out


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], signed: bool) -> torch.Tensor:
    """Unpack :func:`pack_codes` output to codes of ``shape``: int8 when ``signed`` else uint8.

    ``packed`` is uint8 ``[packed_nbytes(prod(shape), bits)]``; another size raises PackingError.
    """
    _check_bits(bits)
    n = math.prod(shape)
    flat = packed.detach().reshape(-1).cpu()
    if flat.dtype != torch.uint8:
        raise PackingError(f"packed codes must be uint8, got {flat.dtype}")
    if flat.numel() != packed_nbytes(n, bits):
        raise PackingError(f"{flat.numel()} packed bytes do not hold {n} codes of {bits} bits "
                           f"(expected {packed_nbytes(n, bits)})")
    out = torch.empty(n, dtype=torch.int8 if signed else torch.uint8)
    half = 1 << (bits - 1)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        first = start * bits // 8
        nbytes = math.ceil(count / 8) * bits
        chunk = flat[first:first + nbytes]
        if bits == 8:
            out[start:start + count] = chunk.view(out.dtype)[:count]
            continue
        if bits == 4:
            whole = chunk.numel() * 2 == count  # then the nibbles go straight into ``out``
            pairs = out[start:start + count].view(-1, 2) if whole else torch.empty(chunk.numel(), 2, dtype=out.dtype)
            if signed:  # arithmetic shifts of the byte as int8 sign-extend each nibble
                torch.bitwise_right_shift((chunk << 4).view(torch.int8), 4, out=pairs[:, 0])
                torch.bitwise_right_shift(chunk.view(torch.int8), 4, out=pairs[:, 1])
            else:
                torch.bitwise_and(chunk, 0xF, out=pairs[:, 0])
                torch.bitwise_right_shift(chunk, 4, out=pairs[:, 1])
            if not whole:
                out[start:start + count] = pairs.reshape(-1)[:count]
            continue
        if chunk.numel() < nbytes:
            chunk = torch.cat([chunk, chunk.new_zeros(nbytes - chunk.numel())])
        values = _unpack_chunk(chunk, bits)[:count]
        if signed:
            values = torch.where(values >= half, values - (1 << bits), values)
        out[start:start + count] = values.to(out.dtype)
    return out.reshape(shape)
