"""A lookup-table scheme: each group's levels are the k-means centroids of its own values
(palettization). It needs no companion algorithm: core calls ``lut`` with the values it is about
to quantize, and the record carries the table."""

from __future__ import annotations

import attrs
import torch

import quanta
from quanta.contracts import Scheme
from quanta.errors import ConfigError


@attrs.frozen(kw_only=True)
class KMeansConfig:
    """Options of ``kmeans`` (recipe: ``scheme: {name: kmeans, iterations: 16}``)."""

    iterations: int = attrs.field(default=8, metadata={"doc": "Lloyd iterations from uniform levels"})

    def __attrs_post_init__(self):
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ConfigError(f"must be a non-negative integer, got {self.iterations!r}", "iterations")


class KMeansScheme(Scheme):
    """``2 ** bits`` levels per group: uniform over the group's range, refined by k-means."""

    name = "kmeans"
    description = "per-group k-means lookup table (palettization), computed from the weights"
    config_class = KMeansConfig
    grid = "lut"  # codes index a table: Core ML's affine constexpr ops cannot store it

    def check_spec(self, spec):
        if spec.dtype.signed:  # codes are table indices 0 .. 2**bits - 1
            raise ConfigError(f"kmeans codes index a table: use an unsigned dtype such as uint4, not {spec.dtype}",
                              "dtype")

    def lut(self, values, spec):  # values [G, K] -> table [G, 2**bits], one row per group
        n = 1 << spec.dtype.bits
        lo, hi = values.amin(dim=1, keepdim=True), values.amax(dim=1, keepdim=True)  # [G, 1]
        steps = torch.linspace(0, 1, n, dtype=values.dtype, device=values.device)
        centroids = lo + (hi - lo) * steps  # [G, n]: uniform levels to start from
        for _ in range(self.config.iterations):
            codes = self.quantize_lut(values, centroids).long()  # nearest level of each value
            sums = torch.zeros_like(centroids).scatter_add_(1, codes, values)
            counts = torch.zeros_like(centroids).scatter_add_(1, codes, torch.ones_like(values))
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty level stays
        return centroids

    # Without a table (the required methods): the uniform levels k-means starts from.
    def quant_range(self, dtype):
        return 0, (1 << dtype.bits) - 1

    def qparams(self, min_val, max_val, dtype):  # [G] each
        lo, hi = torch.clamp(min_val, max=0), torch.clamp(max_val, min=0)  # zero is a level
        scale = (hi - lo) / ((1 << dtype.bits) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # never a zero scale
        return scale, torch.round(-lo / scale).clamp(0, (1 << dtype.bits) - 1)

    def quantize(self, values, scale, zero_point, dtype):  # [G, K], [G, 1], [G, 1]
        return torch.round(values / scale + zero_point).clamp(*self.quant_range(dtype))

    def dequantize(self, codes, scale, zero_point):
        return (codes - zero_point) * scale


@quanta.hookimpl
def register_schemes(register):
    register(KMeansScheme())
