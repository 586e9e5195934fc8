"""Base classes of the five plugin kinds. Subclassing is optional: the registry checks
that a contribution has the attributes and methods of its kind (``REQUIRED``)."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .spec import QuantDtype, QuantSpec

__all__ = ["Scheme", "Observer", "Algorithm", "Backend", "Exporter", "Unit", "REQUIRED"]

#: kind -> methods a contribution must have (besides ``name`` and ``description``).
REQUIRED = {
    "scheme": ("quant_range", "qparams", "quantize", "dequantize"),
    "observer": ("observe",),
    "algorithm": ("run",),
    "backend": ("accepts", "units", "copy", "read_weight", "write", "snapshot", "restore"),
    "exporter": ("export",),
}


class Scheme:
    """Maps float values to integers and back, given a range.

    Tensors are grouped: ``values`` is ``[G, K]`` (one row per qparam group), ``min_val`` and
    ``max_val`` are ``[G]``, and ``scale``/``zero_point`` passed to ``quantize`` are ``[G, 1]``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type | None] = None

    def quant_range(self, dtype: QuantDtype) -> tuple[int, int]:
        """The integer codes this scheme uses for ``dtype``: ``(qmin, qmax)``."""
        raise NotImplementedError

    def qparams(self, min_val: torch.Tensor, max_val: torch.Tensor, dtype: QuantDtype):
        """``(scale [G], zero_point [G] or None)`` for per-group ranges. Never a zero or NaN scale."""
        raise NotImplementedError

    def quantize(self, values, scale, zero_point, dtype: QuantDtype) -> torch.Tensor:
        """Float tensor of integer codes, clamped to ``quant_range(dtype)``, values' shape."""
        raise NotImplementedError

    def dequantize(self, codes, scale, zero_point) -> torch.Tensor:
        """Float values represented by ``codes``."""
        raise NotImplementedError


class Observer:
    """Chooses the range of a tensor: ``observe(values [G, K], spec, scheme) -> (min [G], max [G])``.

    ``ranges_carry_non_finite = True`` declares that a group holding NaN or inf always gets a
    non-finite range (true of exact min/max), so the full NaN/inf scan of the weight can be
    skipped; the default (False) keeps the scan.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type | None] = None
    ranges_carry_non_finite: ClassVar[bool] = False

    def observe(self, values: torch.Tensor, spec: QuantSpec, scheme: Scheme):
        raise NotImplementedError


class Unit:
    """One quantizable weight of a model, as a backend enumerates it.

    Attributes: ``name`` (layer name used in configs and reports), ``module_type`` (class
    name), ``type_mro`` (class names most specific first, for ``module_type_configs``),
    ``param`` (parameter name), ``shape``, ``channel_axis``, ``input_axis`` and ``handle``
    (backend-private object, e.g. the torch module).
    """

    __slots__ = ("name", "module_type", "type_mro", "param", "shape", "channel_axis", "input_axis", "handle")

    def __init__(self, name, module_type, type_mro, param, shape, channel_axis=0, input_axis=1, handle=None):
        self.name, self.module_type, self.type_mro, self.param = name, module_type, tuple(type_mro), param
        self.shape, self.channel_axis, self.input_axis, self.handle = tuple(shape), channel_axis, input_axis, handle

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {self.module_type}, {self.param}, shape={self.shape})"


class Algorithm:
    """Transforms a whole model: ``run(model, plan, data, context)`` quantizes ``plan.selected``.

    ``needs_data`` says whether calibration data is required. ``config_class`` holds the
    algorithm's options (recipe keys outside the layer configs). ``global_types``: per backend
    name, the layer type names ``global_config`` applies to under this algorithm (a subclass
    counts; e.g. ``{"torch": ("Conv2d", "Linear")}``); other layers stay float unless
    ``module_type_configs`` or ``module_name_configs`` name them. A backend not listed, or None
    (the default): every type the backend enumerates.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type | None] = None
    needs_data: ClassVar[bool] = False
    global_types: ClassVar[Mapping[str, tuple[str, ...]] | None] = None

    def run(self, model: Any, plan, data, context) -> None:
        raise NotImplementedError


class Backend:
    """A model representation: enumerate its quantizable weights and write records back."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type | None] = None

    def accepts(self, model: Any) -> bool:
        raise NotImplementedError


class Exporter:
    """Writes a quantized model to a file: ``export(model, path, **options) -> path``."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type | None] = None

    def export(self, model: Any, path, **options):
        raise NotImplementedError
