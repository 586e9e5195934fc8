"""The ``observer`` contract: which range a tensor gets."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from quanta._records.spec import QuantSpec

from .base import Plugin

if TYPE_CHECKING:
    from .scheme import Scheme

__all__ = ["Observer"]


class Observer(Plugin):
    """Chooses the range each group of a tensor is quantized over.

    Required: :meth:`observe`. Declared: ``ranges_carry_non_finite``, ``exact_ranges``. Optional:
    :meth:`check_spec`, :meth:`streaming` (activations).
    """

    kind: ClassVar[str] = "observer"
    #: True when a group holding NaN or inf always gets a non-finite range (exact min/max do),
    #: so core can skip its own NaN/inf scan of the weight; False (the default) keeps the scan.
    ranges_carry_non_finite: ClassVar[bool] = False
    #: True when :meth:`observe` returns each group's exact minimum and maximum (every value lies
    #: within its group's range; NaN for a group holding NaN, as torch's amin/amax give): QAT then learns from the ``[G]`` range, not a pass over the
    #: codes, whether any code clamps. Honoured only on the class that defines ``observe``.
    exact_ranges: ClassVar[bool] = False
    #: The keyword options :meth:`streaming` takes (e.g. ``{"averaging_constant"}``); the
    #: activation path passes only these, so it never special-cases an observer by name.
    streaming_options: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def observe(self, values: torch.Tensor, spec: QuantSpec, scheme: "Scheme") -> tuple[torch.Tensor, torch.Tensor]:
        """``(min_val [G], max_val [G])`` for ``values`` ``[G, K]`` (one row per group).

        Must treat rows independently (core calls it on chunks of rows), return finite ranges
        for finite input with ``min_val <= max_val``, and not modify ``values``. ``scheme`` is
        the scheme that will quantize (a clip search may call its methods). Core checks the
        shapes and order of the result and names this plugin when they are wrong."""

    def check_spec(self, spec: QuantSpec) -> None:
        """Refuse a spec this observer cannot serve by raising ``quanta.ConfigError``; called at
        plan time. The default accepts every spec."""

    def streaming(self, spec: QuantSpec | None = None, **options: Any) -> torch.nn.Module | None:
        """A fresh ``nn.Module`` tracking an activation's range batch by batch (its forward takes a
        tensor; attributes ``min_val``/``max_val``), or None when this observer has no streaming
        form. Used by the activation-quantization algorithms (``calibrate``, ``qat``), which pass
        only the options named in ``streaming_options``."""
        return None
