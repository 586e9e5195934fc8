"""Scheme ``pow2``: symmetric quantization whose scales are powers of two (shift-only dequantization)."""

import torch

import quanta
from quanta.plugins.schemes import SymmetricScheme


class PowerOfTwoScheme(SymmetricScheme):
    name = "pow2"
    description = "symmetric quantization with scales rounded up to a power of two"

    def qparams(self, min_val, max_val, dtype):
        scale, zero_point = super().qparams(min_val, max_val, dtype)
        return torch.exp2(torch.ceil(torch.log2(scale))), zero_point


@quanta.hookimpl
def register_schemes(register):
    register(PowerOfTwoScheme())
