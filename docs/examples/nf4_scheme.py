"""A scheme with a non-uniform grid: NormalFloat4 (NF4), 16 fixed levels times each group's absmax."""

from __future__ import annotations

import torch

import quanta
from quanta.contracts import Scheme
from quanta.errors import ConfigError

#: The 16 NF4 levels (quantiles of a normal distribution, scaled to [-1, 1]).
NF4_LEVELS = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


class NF4Scheme(Scheme):
    """Codes 0..15 index ``NF4_LEVELS``; a group's scale is its largest absolute value."""

    name = "nf4"
    description = "NormalFloat4: 16 normal-quantile levels times the group's absmax"
    grid = "lut"  # dequantize is a table lookup, not (codes - zero_point) * scale

    def check_spec(self, spec):
        # Called at plan time, before any weight changes.
        if spec.dtype.bits != 4 or spec.dtype.signed:
            raise ConfigError(f"nf4 has 16 levels: use dtype uint4, not {spec.dtype}", "dtype")

    def quant_range(self, dtype):
        return 0, 15

    def qparams(self, min_val, max_val, dtype):
        absmax = torch.maximum(min_val.abs(), max_val.abs())  # [G]
        # Never a zero scale: an all-zero group gets 1.0 (its codes all stand for 0.0).
        return torch.where(absmax > 0, absmax, torch.ones_like(absmax)), None

    def quantize(self, values, scale, zero_point, dtype):
        levels = NF4_LEVELS.to(values.device, values.dtype)  # [16]
        normalized = (values / scale).unsqueeze(-1)  # [G, K, 1]
        return (normalized - levels).abs().argmin(dim=-1).to(values.dtype)  # [G, K], integers 0..15

    def dequantize(self, codes, scale, zero_point):
        levels = NF4_LEVELS.to(codes.device, scale.dtype)
        return levels[codes.long()] * scale  # [G, K]


@quanta.hookimpl
def register_schemes(register):
    register(NF4Scheme())
