"""The per-tensor fake-quant op: the scheme's values forward, straight-through gradient backward."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta.fx.fake_quant import fake_quantize_per_tensor


@pytest.mark.parametrize("scheme,dtype", [("symmetric", "int8"), ("affine", "uint8"), ("affine", "int8")])
def test_forward_is_the_schemes_quantize_dequantize(scheme, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    impl = quanta.registry.get("scheme", scheme).obj
    qdtype = quanta.QuantSpec(dtype=dtype).dtype
    lo, hi = x.min().reshape(1) * 0.5, x.max().reshape(1) * 0.5  # a clipped range: some codes clamp
    scale, zp = impl.qparams(lo, hi, qdtype)
    qmin, qmax = impl.quant_range(qdtype)
    zp_val = 0 if zp is None else int(zp)
    expected = impl.dequantize(impl.quantize(x.reshape(1, -1), scale[:, None], None if zp is None else zp[:, None],
                                             qdtype), scale[:, None], None if zp is None else zp[:, None])
    got = fake_quantize_per_tensor(x, float(scale), zp_val, qmin, qmax)
    assert torch.equal(got.reshape(1, -1), expected)


def test_gradient_passes_only_where_codes_are_in_range():
    x = torch.tensor([-10.0, -0.3, 0.0, 0.26, 10.0], requires_grad=True)
    y = fake_quantize_per_tensor(x, 0.1, 0, -8, 7)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(y, torch.tensor([-0.8, -0.3, 0.0, 0.3, 0.7]))
