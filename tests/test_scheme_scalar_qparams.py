"""``qparams_scalar``: the built-in schemes' Python-float qparams (an activation's range each QAT
step) equal their tensor ``qparams`` bit for bit; schemes without it, or subclasses overriding
``qparams`` alone, keep their own arithmetic."""

from __future__ import annotations

import struct

import pytest
import torch

import quanta
from quanta.fx.fake_quant import ActivationFakeQuantize
from quanta.plugins.activation_observers import StreamingMovingAverageMinMax
from quanta.plugins.schemes import AffineScheme, SymmetricConfig, SymmetricScheme


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _ranges():
    gen = torch.Generator().manual_seed(5)
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-31, 1e30, -1e30, 2e30, 3e38, 1.0, -1.0, 0.5, 127.0, 255.0, 1e-8,
             -2.5, 1e20]
    pairs = [(a, b) for a in edges for b in edges]
    for scale in (1e-6, 1e-3, 1.0, 7.0, 300.0, 1e5, 1e12):
        v = (torch.randn(400, 2, generator=gen) * scale).tolist()
        pairs += [(_f32(a), _f32(b)) for a, b in v]
        pairs += [(_f32(min(a, b)), _f32(max(a, b))) for a, b in v]
        pairs += [(_f32(abs(a)), _f32(abs(a) + abs(b))) for a, b in v[:50]]  # ranges above zero
    return pairs


def _symmetric(grid: str) -> SymmetricScheme:
    scheme = SymmetricScheme()
    scheme.config = SymmetricConfig(grid=grid)
    return scheme


SCHEMES = [_symmetric("auto"), _symmetric("full"), _symmetric("restricted"), AffineScheme()]


@pytest.mark.parametrize("scheme", SCHEMES, ids=["symmetric", "symmetric-full", "symmetric-restricted", "affine"])
@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
def test_scalar_qparams_equal_tensor_qparams_bit_for_bit(scheme, dtype):
    qdtype = quanta.QuantSpec(dtype=dtype).dtype
    fast = 0
    for lo, hi in _ranges():
        got = scheme.qparams_scalar(lo, hi, qdtype)
        if got is None:
            continue
        fast += 1
        scale, zp = scheme.qparams(torch.tensor([lo]), torch.tensor([hi]), qdtype)
        assert struct.pack("f", got[0]) == struct.pack("f", float(scale)), (lo, hi)
        assert (got[1] is None) == (zp is None), (lo, hi)
        if zp is not None:
            assert got[1] == float(zp), (lo, hi)
    assert fast > 2000  # the fast path serves ordinary ranges


class _HalfScaleAffine(AffineScheme):
    # A third-party subclass overriding qparams alone: its qparams must be used, not the inherited
    # qparams_scalar.
    name = "half_scale_affine"

    def qparams(self, min_val, max_val, dtype):
        scale, zp = super().qparams(min_val, max_val, dtype)
        return scale / 2, zp


class _NoScalar(quanta.contracts.Scheme):
    name = "no_scalar"

    def quant_range(self, dtype):
        return 0, 255

    def qparams(self, min_val, max_val, dtype):
        return torch.full_like(min_val, 0.25), torch.full_like(min_val, 3.0)

    def quantize(self, values, scale, zero_point, dtype):
        return torch.div(values, scale).round_().add_(zero_point).clamp_(0, 255)

    def dequantize(self, codes, scale, zero_point):
        return (codes - zero_point) * scale


@pytest.mark.parametrize("scheme,expected", [(_HalfScaleAffine(), None), (_NoScalar(), (0.25, 3)),
                                             (AffineScheme(), None)])
def test_activation_quantizer_honours_the_schemes_qparams(monkeypatch, scheme, expected):
    from quanta.fx import fake_quant

    monkeypatch.setattr(fake_quant, "resolve_scheme", lambda name: scheme)
    dtype = quanta.QuantSpec(dtype="uint8").dtype
    afq = ActivationFakeQuantize(StreamingMovingAverageMinMax(), scheme.name, dtype)
    x = torch.randn(4, 16) * 3
    out = afq(x)
    lo, hi = afq.observer.min_val.reshape(1), afq.observer.max_val.reshape(1)
    scale, zp = scheme.qparams(lo, hi, dtype)
    want = (float(scale), int(zp)) if expected is None else expected
    assert afq.qparams() == want
    assert float(afq.scale) == want[0] and int(afq.zero_point) == want[1]
    assert afq._scalar == (type(scheme) is AffineScheme)
    qmin, qmax = scheme.quant_range(dtype)
    ref = (torch.div(x, want[0]).round_().add_(want[1]).clamp_(qmin, qmax) - want[1]) * want[0]
    assert torch.equal(out, ref)
