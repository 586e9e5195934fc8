"""A scheme in a few lines: symmetric quantization whose scales are powers of two."""

import torch

import quanta
from quanta.contracts import Scheme


class PowerOfTwoScheme(Scheme):
    name = "pow2"
    description = "symmetric quantization with scales rounded up to a power of two"

    def quant_range(self, dtype):
        half = 2 ** (dtype.bits - 1)
        return (-half + 1, half - 1) if dtype.signed else (0, 2 * half - 1)

    def qparams(self, min_val, max_val, dtype):  # [G], [G] -> scale [G], zero point [G] or None
        qmin, qmax = self.quant_range(dtype)
        absmax = torch.maximum(min_val.abs(), max_val.abs())
        absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # never a zero scale
        scale = torch.exp2(torch.ceil(torch.log2(absmax / ((qmax - qmin) // 2))))
        zero_point = None if dtype.signed else torch.full_like(scale, float((qmax + 1) // 2))
        return scale, zero_point

    def quantize(self, values, scale, zero_point, dtype):  # [G, K], [G, 1], [G, 1] or None
        qmin, qmax = self.quant_range(dtype)
        codes = torch.round(values / scale)
        return (codes if zero_point is None else codes + zero_point).clamp(qmin, qmax)

    def dequantize(self, codes, scale, zero_point):  # affine: (codes - zero_point) * scale
        return (codes if zero_point is None else codes - zero_point) * scale


@quanta.hookimpl
def register_schemes(register):
    register(PowerOfTwoScheme())
