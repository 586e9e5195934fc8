"""Built-in weight observers: ``minmax``, ``mse`` (clip search) and ``percentile``."""

from __future__ import annotations

import math
from typing import Any, cast

import attrs
import torch

import quanta
from quanta.contracts import Observer
from quanta._records.spec import QuantSpec
from quanta.errors import ConfigError

__all__ = ["MinMaxObserver", "MSEObserver", "PercentileObserver"]


def _batch_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``'s minimum and maximum as float32 0-d tensors (``.float()`` only where it converts)."""
    lo, hi = torch.aminmax(x.detach())
    if lo.dtype != torch.float32:
        lo, hi = lo.float(), hi.float()
    return lo, hi


class StreamingMinMax(torch.nn.Module):
    """Running minimum and maximum over every batch seen. ``forward(x)``: any shape, returns None."""

    def __init__(self) -> None:
        super().__init__()
        self.min_val: torch.Tensor
        self.max_val: torch.Tensor
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def observed(self) -> bool:
        return math.isfinite(float(self.min_val))

    def forward(self, x: torch.Tensor) -> None:
        # absorb(summarize(x)) without the stacking: the same values in three ops, not six (a
        # training step pays this per activation, where op dispatch is most of the cost; the
        # buffers from the dict, not through nn.Module's attribute look-up).
        lo, hi = _batch_range(x)
        min_val, max_val = self._range_buffers()
        torch.minimum(min_val, lo, out=min_val)
        torch.maximum(max_val, hi, out=max_val)

    def _range_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        # min_val and max_val from the buffer dict (not nn.Module's __getattr__: once per step each)
        buffers = self._buffers
        return cast(torch.Tensor, buffers["min_val"]), cast(torch.Tensor, buffers["max_val"])

    def summarize(self, x: torch.Tensor) -> torch.Tensor:
        """What one call contributes: ``[min, max]`` of ``x`` (float32). A distributed run
        (``Ranks.collect``) gathers these in the global order of the calls and :meth:`absorb` folds them in."""
        lo, hi = torch.aminmax(x.detach())
        return torch.stack([lo.float(), hi.float()])

    def absorb(self, summary: torch.Tensor) -> None:
        """Update the range with one call's :meth:`summarize` result."""
        torch.minimum(self.min_val, summary[0], out=self.min_val)
        torch.maximum(self.max_val, summary[1], out=self.max_val)


class MinMaxObserver(Observer):
    """The exact minimum and maximum of each group (what coremltools uses)."""

    name = "minmax"
    description = "exact per-group minimum and maximum (coremltools' behaviour)"
    ranges_carry_non_finite = True  # amin/amax propagate NaN and inf
    exact_ranges = True

    def observe(self, values, spec, scheme) -> tuple[torch.Tensor, torch.Tensor]:
        # Two reductions: torch.aminmax along rows is several times slower on CPU.
        return values.amin(dim=1), values.amax(dim=1)

    def streaming(self, spec: QuantSpec | None = None, **options: Any) -> torch.nn.Module:
        """For activations: the running minimum and maximum over every batch seen."""
        return StreamingMinMax()


@attrs.frozen(kw_only=True)
class MSEConfig:
    """Options of the ``mse`` observer."""

    grid: int = attrs.field(default=40, metadata={"doc": "number of shrink factors tried between min_ratio and 1"})
    min_ratio: float = attrs.field(default=0.5, metadata={"doc": "smallest fraction of the min/max range tried"})
    norm: float = attrs.field(default=2.0, metadata={"doc": "error exponent (2 = mean squared error)"})

    def __attrs_post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ConfigError(f"must be a positive integer, got {self.grid!r}", "grid")
        if not isinstance(self.min_ratio, (int, float)) or not 0 < self.min_ratio <= 1:
            raise ConfigError(f"must be a number in (0, 1], got {self.min_ratio!r}", "min_ratio")
        if not isinstance(self.norm, (int, float)) or self.norm <= 0:
            raise ConfigError(f"must be a positive number, got {self.norm!r}", "norm")


class MSEObserver(Observer):
    """Shrinks each group's range by the factor (from a grid) that minimises its quantization error."""

    name = "mse"
    description = "clip search: per-group range shrink minimising the quantization error"
    config_class = MSEConfig

    def __init__(self, config: MSEConfig | None = None) -> None:
        self.config = config or MSEConfig()

    def observe(self, values, spec, scheme) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        lo, hi = values.amin(dim=1), values.amax(dim=1)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(cfg.grid + 1):  # a loop over candidates, each step vectorised over all groups
            ratio = 1.0 - (1.0 - cfg.min_ratio) * i / cfg.grid
            c_lo, c_hi = lo * ratio, hi * ratio
            scale, zp = scheme.qparams(c_lo, c_hi, spec.dtype)
            scale2 = scale[:, None]
            zp2 = None if zp is None else zp[:, None]
            deq = scheme.dequantize(scheme.quantize(values, scale2, zp2, spec.dtype), scale2, zp2)
            err = (deq - values).abs().pow(cfg.norm).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        return best_lo, best_hi


@attrs.frozen(kw_only=True)
class PercentileConfig:
    """Options of the ``percentile`` observer."""

    percentile: float = attrs.field(default=99.99, metadata={"doc": "upper percentile of each group kept (50-100)"})

    def __attrs_post_init__(self) -> None:
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50 <= self.percentile <= 100:
            raise ConfigError(f"must be a number in [50, 100], got {self.percentile!r}", "percentile")


class PercentileObserver(Observer):
    """Clips each group to its [100 - p, p] percentiles (robust to outliers)."""

    name = "percentile"
    description = "per-group [100-p, p] percentile range, robust to outliers"
    config_class = PercentileConfig

    def __init__(self, config: PercentileConfig | None = None) -> None:
        self.config = config or PercentileConfig()

    def observe(self, values, spec, scheme) -> tuple[torch.Tensor, torch.Tensor]:
        k = values.shape[1]
        q = self.config.percentile / 100.0
        hi_idx = min(k, max(1, int(round(q * k))))
        lo_idx = max(1, k + 1 - hi_idx)
        lo = values.kthvalue(lo_idx, dim=1).values
        hi = values.kthvalue(hi_idx, dim=1).values
        return lo, hi


@quanta.hookimpl
def register_observers(register) -> None:
    register(MinMaxObserver())
    register(MSEObserver())
    register(PercentileObserver())
