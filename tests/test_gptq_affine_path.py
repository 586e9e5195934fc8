"""The solver's fast path for the built-in affine schemes gives the general path's results bit for bit.

``PluginQuantizer.affine_range`` lets the solver run the built-in ``symmetric``/``affine`` schemes'
operations itself (``sweep_batch_affine``: fewer tensor operations a column, no calls into the scheme)
and write its final codes and values into the sweep's spent buffers. A third-party scheme, or a
subclass overriding ``quantize``/``dequantize``, takes the general path. Both must give the same
codes, scales, zero points, weights (signs of zero included) and loss.
"""

from __future__ import annotations

import pytest
import torch

from quanta._records.spec import QuantSpec
from quanta.plugins.gptq.algorithm import PluginQuantizer
from quanta.plugins.gptq.solver import gptq_quantize
from quanta.plugins.schemes import SymmetricConfig, SymmetricScheme


class OnlyTheProtocol:
    """The same scheme seen through the solver's minimal protocol: fit, quantize, dequantize."""

    def __init__(self, inner: PluginQuantizer) -> None:
        self.inner = inner

    def fit(self, w):
        return self.inner.fit(w)

    def quantize(self, w, scale, zero_point):
        return self.inner.quantize(w, scale, zero_point)

    def dequantize(self, codes, scale, zero_point):
        return self.inner.dequantize(codes, scale, zero_point)


def _layer(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 3] = 0.0
    w[::3, 5] = -0.0  # negative zeros and values that round to -0.0 in the weight
    w[1::4, 6] = -1e-9
    x = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x[:, 7] = 0.0  # a dead input
    return w, x.t() @ x / x.shape[0]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.is_floating_point():
        return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


SPECS = {
    "uint4 symmetric full (zero point 8)": QuantSpec(dtype="uint4", scheme="symmetric", granularity="per_block",
                                                     block_size=32, scheme_config=SymmetricConfig(grid="full")),
    "int4 symmetric (no zero point)": QuantSpec(dtype="int4", granularity="per_block", block_size=32),
    "int8 symmetric restricted, per channel": QuantSpec(dtype="int8", granularity="per_channel"),
    "uint4 affine (a zero point per row)": QuantSpec(dtype="uint4", scheme="affine", granularity="per_block",
                                                     block_size=32),
    "int4 affine, per channel": QuantSpec(dtype="int4", scheme="affine", granularity="per_channel"),
}


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_affine_path_matches_general_path(spec, act_order, static_groups, threads):
    fast = PluginQuantizer(spec)
    assert fast.affine_range() == fast.scheme.quant_range(spec.dtype)
    w, h = _layer(48, 128, seed=len(str(spec)))
    kw = dict(block_size=spec.block_size, processing_group_size=40, act_order=act_order, static_groups=static_groups)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = gptq_quantize(w, h, fast, **kw)
        b = gptq_quantize(w, h, OnlyTheProtocol(PluginQuantizer(spec)), **kw)
    finally:
        torch.set_num_threads(before)
    for name in ("codes", "scale", "zero_point", "weight"):
        assert _same(getattr(a, name), getattr(b, name)), name
    assert a.loss == b.loss and a.damp == b.damp
    assert not bool(torch.signbit(a.weight[a.weight == 0]).any())  # zeros are 0.0, never -0.0


class RoundingDown(SymmetricScheme):
    """A third-party variant: floors instead of rounding (its quantize is its own)."""

    name = "rounding_down"
    config_class = SymmetricConfig

    def quantize(self, values, scale, zero_point, dtype):
        qmin, qmax = self.quant_range(dtype)
        codes = torch.floor(values / scale)
        return (codes + zero_point if zero_point is not None else codes).clamp(qmin, qmax)


def test_other_schemes_take_the_general_path():
    spec = QuantSpec(dtype="int4", granularity="per_block", block_size=32)
    quantizer = PluginQuantizer(spec)
    quantizer.scheme = RoundingDown()
    assert quantizer.affine_range() is None
    w, h = _layer(16, 64, seed=1)
    res = gptq_quantize(w, h, quantizer, block_size=32)
    # The subclass's own floor reached the codes: the general path ran its quantize.
    ref = gptq_quantize(w, h, OnlyTheProtocol(quantizer), block_size=32)
    assert _same(res.codes, ref.codes) and _same(res.weight, ref.weight)
    default = gptq_quantize(w, h, PluginQuantizer(spec), block_size=32)
    assert not torch.equal(res.codes, default.codes)
