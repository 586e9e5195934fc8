"""Built-in schemes ``symmetric`` and ``affine``.

``affine`` and ``symmetric`` on its ``restricted`` grid follow
``coremltools.optimize._utils.quantize_weight_by_dtype`` operation for operation in float32,
so codes, scales and zero points are bit-identical to ``PostTrainingQuantizer`` and
``linear_quantize_weights``. ``symmetric`` on its ``full`` grid is coremltools' GPTQ grid (and
llm-compressor's): 2^b levels, scale ``2·max|w| / (2^b - 1)``. One deliberate difference
from coremltools: a group whose range is zero (all zeros) gets scale 1.0 instead of NaN codes.
"""

from __future__ import annotations

import struct

import attrs
import torch

import quanta
from quanta.contracts import Scheme
from quanta.errors import ConfigError, did_you_mean
from quanta._records.qmath import full_range, restricted_range
from quanta._records.spec import QuantDtype

__all__ = ["SymmetricConfig", "SymmetricScheme", "AffineScheme", "SYMMETRIC_GRIDS"]

#: The symmetric scheme's grids: ``auto`` picks ``full`` at 4 bits and below, else ``restricted``.
SYMMETRIC_GRIDS = ("auto", "restricted", "full")
#: ``auto`` uses the full grid at this many bits and fewer.
_AUTO_FULL_MAX_BITS = 4


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # A zero range would divide by zero; any positive scale codes zeros exactly.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _f32(x: float) -> float:
    # One float32 rounding of a Python float: a single +, -, * or / of float32 values done in
    # float64 and rounded once to float32 is the float32 operation's result (float64 carries more
    # than 2 * 24 + 2 bits). Callers keep magnitudes in _NORMAL (no overflow, no subnormals).
    return struct.unpack("f", struct.pack("f", x))[0]


#: Magnitudes the scalar qparams handle (else they return None and the tensor path runs).
_NORMAL = (1e-30, 1e30)


def _f32_range(min_val: float, max_val: float) -> tuple[float, float] | None:
    """The float32 values :meth:`qparams` would see for a range, or None outside ordinary magnitudes."""
    lo, hi = _f32(min_val), _f32(max_val)
    return (lo, hi) if _normal(lo, hi) else None


def _normal(*values: float) -> bool:
    return all(v == 0.0 or _NORMAL[0] <= abs(v) <= _NORMAL[1] for v in values)


def _check_grid(_inst, _attr, value) -> None:
    if value not in SYMMETRIC_GRIDS:
        raise ConfigError(f"unknown grid {value!r}{did_you_mean(str(value), SYMMETRIC_GRIDS)} "
                          f"(allowed: {', '.join(SYMMETRIC_GRIDS)})", "grid")


@attrs.frozen(kw_only=True)
class SymmetricConfig:
    """Options of the ``symmetric`` scheme (recipe form ``scheme: {name: symmetric, grid: full}``)."""

    grid: str = attrs.field(default="auto", validator=_check_grid, metadata={"doc": (
        "'restricted': codes -(2^(b-1)-1)..2^(b-1)-1, scale max|w|/(2^(b-1)-1) (coremltools' PTQ; int8 -127..127); "
        "'full': 2^b codes, scale 2*max|w|/(2^b-1), signed -2^(b-1)..2^(b-1)-1 or unsigned with zero point "
        "2^(b-1) (coremltools' GPTQ, llm-compressor); 'auto': full at 4 bits and below, restricted above")})


class SymmetricScheme(Scheme):
    """Scale only, range ``[-max|w|, max|w|]``, zero at code 0 (unsigned: at the middle code).

    The grid (``self.config.grid``, :class:`SymmetricConfig`) sets the codes used (all of them
    ``affine`` grids in the contract's sense: ``(codes - zero_point) * scale``):

    - ``restricted``: ``-(2^(b-1)-1)..2^(b-1)-1`` (int8 -127..127, int4 -7..7), scale
      ``max|w| / (2^(b-1)-1)``; unsigned types use ``0..2^b-2`` with zero point ``2^(b-1)-1``.
      coremltools' ``PostTrainingQuantizer`` / ``linear_quantize_weights``, bit for bit.
    - ``full``: all ``2^b`` codes (int4 -8..7), scale ``2·max|w| / (2^b-1)``; unsigned types use
      ``0..2^b-1`` with zero point ``2^(b-1)``. coremltools' GPTQ and llm-compressor's grid: one
      more level, so a smaller step at the same range (the top code clips at ``(1 - 1/(2^b-1))·max``).
    - ``auto`` (default): ``full`` at 4 bits and below, where a 16th level matters; ``restricted``
      above, where it does not and coremltools' int8 codes are kept.
    """

    name = "symmetric"
    description = "scale-only quantization; grid 'auto' (default), 'restricted' (int8 -127..127) or 'full' (int4 -8..7)"
    config_class = SymmetricConfig

    def grid_for(self, dtype: QuantDtype) -> str:
        """The grid used for ``dtype``: ``"restricted"`` or ``"full"`` (``auto`` resolved)."""
        grid = self.config.grid
        if grid == "auto":
            return "full" if dtype.bits <= _AUTO_FULL_MAX_BITS else "restricted"
        return grid

    def quant_range(self, dtype: QuantDtype) -> tuple[int, int]:
        if self.grid_for(dtype) == "full":
            return full_range(dtype.bits, dtype.signed)
        return restricted_range(dtype.bits, dtype.signed)

    def qparams(self, min_val, max_val, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        qmin, qmax = self.quant_range(dtype)
        max_abs = torch.maximum(min_val.abs(), max_val.abs())
        # qmax - qmin is 2^(b-1)·2 - 2 (restricted) or 2^b - 1 (full); coremltools' ops,
        # (max_abs - (-max_abs)) / (qmax - qmin), in place: x + x is x - (-x) bit for bit (NaN,
        # inf and overflow alike), and float constants skip converting int scalars.
        scale = max_abs.add_(max_abs).div_(float(qmax - qmin))
        scale = torch.where(scale > 0.0, scale, 1.0)  # _safe_scale, one op fewer
        if dtype.signed:
            return scale, None
        return scale, torch.full_like(scale, float((qmax + 1) // 2 if self.grid_for(dtype) == "full" else qmax // 2))

    def qparams_scalar(self, min_val: float, max_val: float, dtype: QuantDtype) -> tuple[float, float | None] | None:
        """:meth:`qparams` of one group in Python floats (an activation's range, each training step),
        bit for bit; None outside ordinary magnitudes (then :meth:`qparams` runs)."""
        seen = _f32_range(min_val, max_val)
        if seen is None:
            return None
        min_val, max_val = seen
        qmin, qmax = self.quant_range(dtype)
        max_abs = max(abs(min_val), abs(max_val))
        scale = _f32((max_abs + max_abs) / (qmax - qmin))  # max_abs - (-max_abs): exact in float32 here
        scale = scale if scale > 0 else 1.0
        if dtype.signed:
            return scale, None
        return scale, float((qmax + 1) // 2 if self.grid_for(dtype) == "full" else qmax // 2)

    def quantize(self, values, scale, zero_point, dtype) -> torch.Tensor:
        qmin, qmax = self.quant_range(dtype)
        codes = torch.div(values, scale).round_()  # one allocation; the rest in place
        if zero_point is not None:
            return codes.add_(zero_point).clamp_(qmin, qmax)
        return codes.clamp_(qmin, qmax).add_(0.0)  # -0.0 -> 0.0: a zero code dequantizes to 0.0

    def dequantize(self, codes, scale, zero_point) -> torch.Tensor:
        return (codes - zero_point) * scale if zero_point is not None else codes * scale

    def quantize_into(self, values, scale, zero_point, dtype, out) -> torch.Tensor:
        """In-place fast path of :meth:`quantize`: writes the codes into ``out``."""
        qmin, qmax = self.quant_range(dtype)
        torch.div(values, scale, out=out).round_()
        if zero_point is not None:
            return out.add_(zero_point).clamp_(qmin, qmax)
        # round() keeps the sign of a small negative value (-0.0); adding 0.0 clears it, so the
        # dequantized weight holds 0.0 where coremltools' (integer codes times scale) does.
        return out.clamp_(qmin, qmax).add_(0.0)

    def dequantize_(self, codes, scale, zero_point) -> torch.Tensor:
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

    def qparams(self, min_val, max_val, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def qparams_scalar(self, min_val: float, max_val: float, dtype: QuantDtype) -> tuple[float, float | None] | None:
        """:meth:`qparams` of one group in Python floats (an activation's range, each training step),
        bit for bit; None outside ordinary magnitudes (then :meth:`qparams` runs)."""
        seen = _f32_range(min_val, max_val)
        if seen is None:
            return None
        qmin, qmax = self.quant_range(dtype)
        min_val, max_val = seen
        lo = min_val if min_val < 0.0 else 0.0
        hi = max_val if max_val > 0.0 else 0.0
        span = _f32(hi - lo)
        if not _normal(span):
            return None
        scale = _f32(span / (qmax - qmin))
        scale = scale if scale > 0 else 1.0
        if not span > 0:
            return scale, float(max(qmin, 0))
        numerator = _f32(_f32(qmin * hi) - _f32(qmax * lo))
        zero_point = _f32(numerator / span)
        if not _normal(numerator, zero_point):
            return None
        return scale, float(min(max(round(zero_point), qmin), qmax))

    def quantize(self, values, scale, zero_point, dtype) -> torch.Tensor:
        qmin, qmax = self.quant_range(dtype)
        return torch.div(values, scale).round_().add_(zero_point).clamp_(qmin, qmax)

    def dequantize(self, codes, scale, zero_point) -> torch.Tensor:
        return (codes - zero_point) * scale

    def quantize_into(self, values, scale, zero_point, dtype, out) -> torch.Tensor:
        """In-place fast path of :meth:`quantize`: writes the codes into ``out``."""
        qmin, qmax = self.quant_range(dtype)
        return torch.div(values, scale, out=out).round_().add_(zero_point).clamp_(qmin, qmax)

    def dequantize_(self, codes, scale, zero_point) -> torch.Tensor:
        """In-place fast path of :meth:`dequantize` (overwrites ``codes``)."""
        return codes.sub_(zero_point).mul_(scale)


@quanta.hookimpl
def register_schemes(register) -> None:
    register(SymmetricScheme())
    register(AffineScheme())
