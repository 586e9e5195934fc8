"""An observer with options: each group's range is its mean plus or minus ``sigmas`` standard
deviations, never wider than its actual min/max."""

from __future__ import annotations

import attrs
import torch

import quanta
from quanta.contracts import Observer
from quanta.errors import ConfigError


@attrs.frozen(kw_only=True)
class SigmaConfig:
    """Options of the ``sigma`` observer (recipe: ``observer: {name: sigma, sigmas: 2.5}``)."""

    sigmas: float = attrs.field(default=3.0, metadata={"doc": "half-width of the range in standard deviations"})

    def __attrs_post_init__(self):
        if isinstance(self.sigmas, bool) or not isinstance(self.sigmas, (int, float)) or self.sigmas <= 0:
            raise ConfigError(f"must be a positive number, got {self.sigmas!r}", "sigmas")


class SigmaObserver(Observer):
    """Clips outliers: ``[max(min, mean - k·std), min(max, mean + k·std)]`` per group (row)."""

    name = "sigma"
    description = "per-group mean ± k standard deviations, clipped to the group's min/max"
    config_class = SigmaConfig
    # A group holding NaN gets a NaN range here, but one holding inf does not always: keep
    # core's own NaN/inf scan of the weight (the default, False).
    ranges_carry_non_finite = False

    def observe(self, values, spec, scheme):
        k = self.config.sigmas  # an instance of SigmaConfig: the defaults, or the recipe's options
        lo, hi = values.amin(dim=1), values.amax(dim=1)  # [G] each; rows are independent
        mean = values.mean(dim=1)
        std = values.std(dim=1, unbiased=False)
        return torch.maximum(lo, mean - k * std), torch.minimum(hi, mean + k * std)


@quanta.hookimpl
def register_observers(register):
    register(SigmaObserver())
