"""Activation observers: streaming range trackers, and the ``moving_average_minmax`` observer.

An activation is seen batch by batch, so its observer keeps state. The streaming interface:
an observer plugin may have ``streaming(spec, **options) -> torch.nn.Module`` whose
``forward(x)`` updates two float32 scalar buffers ``min_val`` and ``max_val`` (``+inf`` /
``-inf`` until the first batch). ``quanta.fx.observers.streaming_observer`` (re-exported here)
finds the streaming form by observer name; the built-in ``minmax`` (in ``quanta.plugins.observers``)
streams as :class:`StreamingMinMax`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import quanta
from quanta.errors import ConfigError
from quanta.fx.observers import streaming_observer
from quanta.plugins.observers import MinMaxObserver, StreamingMinMax, _batch_range

__all__ = ["StreamingMinMax", "StreamingMovingAverageMinMax", "MovingAverageMinMaxObserver", "streaming_observer"]


class StreamingMovingAverageMinMax(StreamingMinMax):
    """Exponential moving average of each batch's min and max (torch's and coremltools' default
    activation observer): the first batch sets the range, later ones move it by ``averaging_constant``."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {averaging_constant!r}", "averaging_constant")
        self.averaging_constant = float(averaging_constant)

    def forward(self, x: torch.Tensor) -> None:
        # absorb(summarize(x)) without the stacking (the same values, half the ops).
        self._move(*_batch_range(x))

    def absorb(self, summary: torch.Tensor) -> None:
        """Move the range towards one call's ``[min, max]`` (the first call sets it): the order
        of the calls matters, so a distributed run replays them in global order."""
        self._move(summary[0], summary[1])

    def _move(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        min_val, max_val = self._range_buffers()
        if not math.isfinite(float(min_val)):  # nothing observed yet
            min_val.copy_(lo)
            max_val.copy_(hi)
        else:
            min_val.lerp_(lo, self.averaging_constant)
            max_val.lerp_(hi, self.averaging_constant)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """``moving_average_minmax``: for activations, an exponential moving average of batch ranges.

    On a single tensor (a weight) it is the exact min/max: ``minmax``'s ``observe``.
    """

    name = "moving_average_minmax"
    description = "activations: moving average (constant 0.01) of per-batch min/max; weights: exact min/max"

    streaming_options = frozenset({"averaging_constant"})

    def streaming(self, spec: Any = None, averaging_constant: float = 0.01, **options: Any) -> nn.Module:
        return StreamingMovingAverageMinMax(averaging_constant)


@quanta.hookimpl
def register_observers(register) -> None:
    register(MovingAverageMinMaxObserver())
