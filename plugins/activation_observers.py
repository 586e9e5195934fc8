"""Activation observers: streaming range trackers, and the ``moving_average_minmax`` observer.

An activation is seen batch by batch, so its observer keeps state. The streaming interface:
an observer plugin may have ``streaming(spec, **options) -> torch.nn.Module`` whose
``forward(x)`` updates two float32 scalar buffers ``min_val`` and ``max_val`` (``+inf`` /
``-inf`` until the first batch). :func:`streaming_observer` finds the streaming form by
observer name; the built-in ``minmax`` (in ``quanta.plugins.observers``) gets its streaming
form here, :class:`StreamingMinMax`.
"""

from __future__ import annotations

import torch
from torch import nn

import quanta
from quanta.errors import ConfigError, did_you_mean
from quanta.plugins.observers import MinMaxObserver

__all__ = ["StreamingMinMax", "StreamingMovingAverageMinMax", "MovingAverageMinMaxObserver", "streaming_observer"]


class StreamingMinMax(nn.Module):
    """Running minimum and maximum over every batch seen. ``forward(x)``: any shape, returns None."""

    def __init__(self):
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def observed(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def forward(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        torch.minimum(self.min_val, lo.float(), out=self.min_val)
        torch.maximum(self.max_val, hi.float(), out=self.max_val)


class StreamingMovingAverageMinMax(StreamingMinMax):
    """Exponential moving average of each batch's min and max (torch's and coremltools' default
    activation observer): the first batch sets the range, later ones move it by ``averaging_constant``."""

    def __init__(self, averaging_constant: float = 0.01):
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {averaging_constant!r}", "averaging_constant")
        self.averaging_constant = float(averaging_constant)

    def forward(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        if not self.observed:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.lerp_(lo.float(), self.averaging_constant)
            self.max_val.lerp_(hi.float(), self.averaging_constant)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """``moving_average_minmax``: for activations, an exponential moving average of batch ranges.

    On a single tensor (a weight) it is the exact min/max: ``minmax``'s ``observe``.
    """

    name = "moving_average_minmax"
    description = "activations: moving average (constant 0.01) of per-batch min/max; weights: exact min/max"

    def streaming(self, spec=None, averaging_constant: float = 0.01) -> nn.Module:
        return StreamingMovingAverageMinMax(averaging_constant)


def streaming_observer(name: str, spec=None, **options) -> nn.Module:
    """A fresh streaming observer module for the observer plugin ``name``.

    Uses the plugin's ``streaming(spec, **options)`` when it has one; ``minmax`` maps to
    :class:`StreamingMinMax`. Raises ConfigError (key ``activation_observer``) otherwise.
    """
    from quanta import registry

    entry = registry.get("observer", name) if name in registry.names("observer") else None
    module = None if entry is None else entry.obj.streaming(spec, **options)
    if module is not None:
        return module
    if name == "minmax" and entry is not None:
        return StreamingMinMax()
    streaming = [e.name for e in registry.entries("observer") if e.name == "minmax" or e.obj.streaming() is not None]
    raise ConfigError(f"observer {name!r} has no streaming form for activations{did_you_mean(name, streaming)} "
                      f"(allowed: {', '.join(streaming)})", "activation_observer")


@quanta.hookimpl
def register_observers(register):
    register(MovingAverageMinMaxObserver())
