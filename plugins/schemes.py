"""Built-in schemes ``symmetric`` and ``affine``, matching coremltools.optimize exactly.

Both follow ``coremltools.optimize._utils.quantize_weight_by_dtype`` operation for
operation in float32, so codes, scales and zero points are bit-identical to
``PostTrainingQuantizer`` and ``linear_quantize_weights``. One deliberate difference: a
group whose range is zero (all zeros) gets scale 1.0 instead of coremltools' NaN codes.
"""

from __future__ import annotations

import torch

import quanta
from quanta.contracts import Scheme
from quanta.qmath import full_range, restricted_range
from quanta.spec import QuantDtype

__all__ = ["SymmetricScheme", "AffineScheme"]


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # A zero range would divide by zero; any positive scale codes zeros exactly.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class SymmetricScheme(Scheme):
    """Scale only: range ``[-max|w|, max|w|]`` over the restricted integer range (int8: -127..127).

    Unsigned types use the zero point ``qmax // 2`` (uint8: 127), as coremltools does.
    """

    name = "symmetric"
    description = "scale-only quantization over the restricted range (int8: -127..127), zero at code 0"

    def quant_range(self, dtype: QuantDtype) -> tuple[int, int]:
        return restricted_range(dtype.bits, dtype.signed)

    def qparams(self, min_val, max_val, dtype):
        qmin, qmax = self.quant_range(dtype)
        max_abs = torch.maximum(min_val.abs(), max_val.abs())
        scale = _safe_scale((max_abs - (-max_abs)) / (qmax - qmin))
        if dtype.signed:
            return scale, None
        return scale, torch.full_like(scale, float(qmax // 2))

    def quantize(self, values, scale, zero_point, dtype):
        qmin, qmax = self.quant_range(dtype)
        codes = torch.div(values, scale).round_()  # one allocation; the rest in place
        if zero_point is not None:
            codes.add_(zero_point)
        return codes.clamp_(qmin, qmax)

    def dequantize(self, codes, scale, zero_point):
        return (codes - zero_point) * scale if zero_point is not None else codes * scale

    def quantize_into(self, values, scale, zero_point, dtype, out):
        """In-place fast path of :meth:`quantize`: writes the codes into ``out``."""
        qmin, qmax = self.quant_range(dtype)
        torch.div(values, scale, out=out).round_()
        if zero_point is not None:
            out.add_(zero_point)
        return out.clamp_(qmin, qmax)

    def dequantize_(self, codes, scale, zero_point):
        """In-place fast path of :meth:`dequantize` (overwrites ``codes``)."""
        if zero_point is not None:
            codes.sub_(zero_point)
        return codes.mul_(scale)


class AffineScheme(Scheme):
    """Scale and zero point over the full integer range; the range always includes 0."""

    name = "affine"
    description = "scale and zero point over the full integer range (int8: -128..127), range includes 0"

    def quant_range(self, dtype: QuantDtype) -> tuple[int, int]:
        return full_range(dtype.bits, dtype.signed)

    def qparams(self, min_val, max_val, dtype):
        qmin, qmax = self.quant_range(dtype)
        lo = torch.minimum(min_val, torch.zeros_like(min_val))
        hi = torch.maximum(max_val, torch.zeros_like(max_val))
        span = hi - lo
        scale = _safe_scale(span / (qmax - qmin))
        zero_point = (qmin * hi - qmax * lo) / torch.where(span > 0, span, torch.ones_like(span))
        if not bool(torch.isfinite(zero_point).all()):
            # float16 overflows qmin * hi for ranges past ~500: those groups are computed in float32
            # (elsewhere the float16 operation order is kept: it is coremltools' own).
            lo32, hi32, span32 = lo.float(), hi.float(), span.float()
            zp32 = (qmin * hi32 - qmax * lo32) / torch.where(span32 > 0, span32, torch.ones_like(span32))
            zero_point = torch.where(torch.isfinite(zero_point), zero_point, zp32.to(zero_point.dtype))
        zero_point = torch.where(span > 0, zero_point, torch.full_like(span, float(max(qmin, 0))))
        return scale, torch.round(zero_point).clamp_(qmin, qmax)

    def quantize(self, values, scale, zero_point, dtype):
        qmin, qmax = self.quant_range(dtype)
        return torch.div(values, scale).round_().add_(zero_point).clamp_(qmin, qmax)

    def dequantize(self, codes, scale, zero_point):
        return (codes - zero_point) * scale

    def quantize_into(self, values, scale, zero_point, dtype, out):
        """In-place fast path of :meth:`quantize`: writes the codes into ``out``."""
        qmin, qmax = self.quant_range(dtype)
        return torch.div(values, scale, out=out).round_().add_(zero_point).clamp_(qmin, qmax)

    def dequantize_(self, codes, scale, zero_point):
        """In-place fast path of :meth:`dequantize` (overwrites ``codes``)."""
        return codes.sub_(zero_point).mul_(scale)


@quanta.hookimpl
def register_schemes(register):
    register(SymmetricScheme())
    register(AffineScheme())
