"""``PluginQuantizer``: a scheme and an observer plugin seen as the GPTQ solver's quantizer.

Split from ``algorithm`` (the layer-wise driver); see ``docs/gptq-solver.md``.
"""

from __future__ import annotations

from typing import Any

import torch

from quanta._run.weights import observer_for, scheme_for
from quanta.plugins.schemes import AffineScheme, SymmetricScheme

__all__ = ["PluginQuantizer"]


def _newer(cls: type, method: str, fast_path: str) -> bool:
    """Whether ``cls`` defines ``method`` in a subclass of the class its ``fast_path`` comes from (the fast
    path may then not do what the method does)."""
    def owner(name: str) -> type:
        return next(k for k in cls.__mro__ if name in vars(k))
    mine, fast = owner(method), owner(fast_path)
    return mine is not fast and issubclass(mine, fast)


#: (quantize, dequantize) of the built-in schemes whose operations ``PluginQuantizer.affine_range`` vouches for.
_AFFINE_METHODS = {(SymmetricScheme.quantize, SymmetricScheme.dequantize), (AffineScheme.quantize, AffineScheme.dequantize)}


class PluginQuantizer:
    """Adapts a scheme and an observer plugin to the solver's ``fit/quantize/dequantize`` contract."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.scheme = scheme_for(spec)
        self.observer = observer_for(spec)

    def fit(self, w) -> Any:
        lo, hi = self.observer.observe(w, self.spec, self.scheme)
        scale, zp = self.scheme.qparams(lo, hi, self.spec.dtype)
        return scale[:, None], (None if zp is None else zp[:, None])

    def quantize(self, w, scale, zero_point) -> torch.Tensor:
        return self.scheme.quantize(w, scale, zero_point, self.spec.dtype)

    def dequantize(self, codes, scale, zero_point) -> torch.Tensor:
        return self.scheme.dequantize(codes, scale, zero_point)

    def dequantize_(self, codes, scale, zero_point) -> torch.Tensor:
        """:meth:`dequantize` overwriting ``codes`` (the scheme's in-place path, unless a subclass
        overrides ``dequantize`` but inherits ``dequantize_``: then its own ``dequantize``, copied)."""
        if _newer(type(self.scheme), "dequantize", "dequantize_"):
            return codes.copy_(self.dequantize(codes, scale, zero_point))
        return self.scheme.dequantize_(codes, scale, zero_point)

    def quantize_into(self, w, scale, zero_point, out) -> torch.Tensor:
        """:meth:`quantize` written into ``out`` (the scheme's ``quantize_into``, unless a subclass
        overrides ``quantize`` but inherits ``quantize_into``: then its own ``quantize``, copied)."""
        if _newer(type(self.scheme), "quantize", "quantize_into"):
            return out.copy_(self.quantize(w, scale, zero_point))
        return self.scheme.quantize_into(w, scale, zero_point, self.spec.dtype, out)

    def affine_range(self) -> tuple[int, int] | None:
        """``(qmin, qmax)`` when the scheme's quantize and dequantize are the built-in ``symmetric`` or
        ``affine`` ones (``clamp(round(w / s) + z, qmin, qmax)``, plus ``0.0`` without a zero point, and
        ``(c - z) * s``), which the solver may then run itself (same operations, fewer calls); None for
        any other scheme, a subclass overriding either method included."""
        cls = type(self.scheme)
        if (cls.quantize, cls.dequantize) not in _AFFINE_METHODS:
            return None
        return self.scheme.quant_range(self.spec.dtype)
