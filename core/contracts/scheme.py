"""The ``scheme`` contract: how float values map to integer codes and back, given a range."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from quanta._records.spec import QuantDtype, QuantSpec

from .base import Plugin

__all__ = ["Scheme", "GRIDS"]

#: The kinds of grid a scheme can declare. ``affine``: a code ``q`` stands for
#: ``(q - zero_point) * scale`` (what Core ML's constexpr ops and compressed-tensors store);
#: ``lut``: a code indexes a table of values (NF4, palettization).
GRIDS = ("affine", "lut")


class Scheme(Plugin):
    """Maps float values to integer codes and back, given a range.

    Tensors are grouped: every method works on ``values`` of shape ``[G, K]`` (one row per group
    sharing a scale: a channel, a block or the whole tensor); ``min_val``/``max_val`` and the
    returned ``scale``/``zero_point`` are ``[G]``; ``scale``/``zero_point`` passed back in are
    ``[G, 1]``. Computation runs in the float dtype and on the device of the inputs (float32, or
    float16 when a backend asks for it); codes are returned as floats holding integers.

    Required: :meth:`quant_range`, :meth:`qparams`, :meth:`quantize`, :meth:`dequantize`.
    Declared: ``grid`` (``"affine"`` or ``"lut"``). Optional: :meth:`check_spec`, the in-place
    fast paths :meth:`quantize_into`/:meth:`dequantize_`, the scalar :meth:`qparams_scalar`, and for ``grid = "lut"`` schemes with a
    per-group table computed from the values (k-means, palettization) :meth:`lut`,
    :meth:`quantize_lut` and :meth:`dequantize_lut`.
    """

    kind: ClassVar[str] = "scheme"
    #: ``"affine"`` when ``dequantize`` is ``(codes - zero_point) * scale``; ``"lut"`` for any
    #: other mapping (a lookup table). Backends and exporters refuse grids they cannot store.
    grid: ClassVar[str] = "affine"

    @abc.abstractmethod
    def quant_range(self, dtype: QuantDtype) -> tuple[int, int]:
        """The integer codes this scheme uses for ``dtype``: ``(qmin, qmax)``, inclusive.

        Called at plan time and for every layer. Must lie within what ``dtype`` can store."""

    @abc.abstractmethod
    def qparams(self, min_val: torch.Tensor, max_val: torch.Tensor,
                dtype: QuantDtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale [G], zero_point [G] or None)`` for per-group ranges ``min_val``/``max_val`` ``[G]``.

        Never a zero, negative, NaN or inf scale, also for all-zero groups (``min == max == 0``).
        ``zero_point`` holds integers (as floats) within ``quant_range(dtype)``; None means 0."""

    @abc.abstractmethod
    def quantize(self, values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 dtype: QuantDtype) -> torch.Tensor:
        """Integer codes (a float tensor of ``values``' shape ``[G, K]``), clamped to ``quant_range(dtype)``.

        ``scale``/``zero_point`` are ``[G, 1]``. Must not modify ``values``."""

    @abc.abstractmethod
    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor,
                   zero_point: torch.Tensor | None) -> torch.Tensor:
        """The float values ``codes`` ``[G, K]`` stand for (``scale``/``zero_point`` ``[G, 1]``).

        For an ``affine`` grid this must equal ``(codes - zero_point) * scale``: exporters store
        exactly that. ``QuantizedWeight.dequantize()`` calls this, so a quantized parameter always
        equals its record's dequantized values."""

    def qparams_scalar(self, min_val: float, max_val: float,
                       dtype: QuantDtype) -> tuple[float, float | None] | None:
        """Optional fast path of :meth:`qparams` for one group given as Python floats (float32
        values): ``(scale, zero_point or None)`` equal, bit for bit, to what :meth:`qparams` returns
        for ``[min_val]``/``[max_val]`` in float32; None: run :meth:`qparams`. Activation quantizers
        call it once per training step. Used only when the class defining :meth:`qparams` defines
        it too (a subclass overriding :meth:`qparams` alone keeps its arithmetic). The default: None."""
        return None

    def check_spec(self, spec: QuantSpec) -> None:
        """Refuse a spec this scheme cannot serve (e.g. NF4 with 8 bits) by raising
        ``quanta.ConfigError`` naming the field. Called once per distinct spec at plan time,
        before any weight changes. The default accepts every spec."""

    def quantize_into(self, values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      dtype: QuantDtype, out: torch.Tensor) -> torch.Tensor:
        """:meth:`quantize` writing into ``out`` (same shape as ``values``); returns ``out``.

        Override for speed (the built-ins work in place); the default copies :meth:`quantize`'s result."""
        return out.copy_(self.quantize(values, scale, zero_point, dtype))

    def dequantize_(self, codes: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None) -> torch.Tensor:
        """:meth:`dequantize` overwriting ``codes``; returns it. Override for speed."""
        return codes.copy_(self.dequantize(codes, scale, zero_point))

    def lut(self, values: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
        """For ``grid = "lut"``: the per-group lookup table ``[G, L]`` (``L <= 2 ** spec.dtype.bits``
        levels, in ``values``' float dtype) computed from the values ``[G, K]`` it is about to
        quantize (k-means clustering, palettization). Rows are independent (core calls it on
        chunks of rows) and ``values`` must not be modified.

        When it returns a table, core quantizes the weight with it: codes from :meth:`quantize_lut`,
        values from :meth:`dequantize_lut` with scale 1, and the record carries the table
        (``record.lut``; saved, restored, and dequantized through :meth:`dequantize_lut`).
        ``qparams``/``quantize``/``dequantize`` and the observer are then not used for the weight.
        The default, None, means no table: ``dequantize`` maps codes itself (NF4's fixed levels)."""
        return None

    def quantize_lut(self, values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        """Codes ``[G, K]`` (floats holding integers ``0 .. L - 1``) of ``values`` ``[G, K]`` given each
        group's table ``lut`` ``[G, L]``. The default picks the nearest entry (by a sorted search,
        so memory stays ``[G, K]`` whatever ``L``)."""
        table, order = lut.to(values.dtype).sort(dim=1)  # [G, L] ascending, and where each entry was
        if table.shape[1] == 1:
            return torch.zeros_like(values)
        midpoints = ((table[:, 1:] + table[:, :-1]) / 2).contiguous()  # [G, L - 1] decision boundaries
        position = torch.searchsorted(midpoints, values.contiguous())  # [G, K] index into the sorted table
        return torch.gather(order, 1, position).to(values.dtype)

    def dequantize_lut(self, codes: torch.Tensor, lut: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Values of ``codes`` ``[G, K]`` that index a per-group lookup table ``lut`` ``[G, L]``,
        times ``scale`` ``[G, 1]``: used for records that carry a table (:meth:`lut`,
        palettization). Must equal ``lut[g, codes[g, k]] * scale[g]`` (``quanta.testing.check_scheme``
        checks it)."""
        return torch.gather(lut.to(scale.dtype), 1, codes.long()) * scale
