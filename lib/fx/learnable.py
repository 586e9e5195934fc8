"""Learnable fake quantization (LSQ / LSQ+): scale and zero point are trained Parameters.

The ``qat`` option ``learnable: true`` (coremltools' ``algorithm: "learnable"``, its
``LearnableFakeQuantize``) uses these in place of :class:`~quanta.fx.fake_quant.WeightFakeQuantize`
and :class:`~quanta.fx.fake_quant.ActivationFakeQuantize`. Semantics, as coremltools':

- while observers are on (milestones), every forward sets ``scale``/``zero_point`` from the
  observed range (the scheme plugin's ``qparams``); once they are off, both are learned;
- the forward is ``(clamp(round(x / s + z), qmin, qmax) - z) * s`` with straight-through
  rounding; the gradients of ``s`` and ``z`` are scaled by ``1 / sqrt(K * qmax)`` (``K``: the
  elements per scale: per group for weights, the whole tensor for activations), as in LSQ;
- ``scale`` is kept ``>= eps``; the zero point is learned only when the scheme has a free one
  (``affine``): it is rounded and clamped to the integer range before each use; ``symmetric``
  keeps the dtype's fixed zero point (0, or the middle code for unsigned types).

``finalize`` records the learned ``scale``/``zero_point`` (weights: :meth:`record_scheme`; activations:
``qparams()``), so the exported model computes what training saw.
"""

from __future__ import annotations

import torch
from torch import nn

from quanta._records.qmath import from_groups, to_groups
from quanta._records.spec import QuantDtype, QuantSpec

from .fake_quant import ActivationFakeQuantize, WeightFakeQuantize

__all__ = ["LearnableWeightFakeQuantize", "LearnableActivationFakeQuantize", "lsq_fake_quantize"]

_EPS = float(torch.finfo(torch.float32).eps)


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    # forward: x; backward: gradient times factor.
    scaled = x * factor
    return (x - scaled).detach() + scaled


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, quant_min: int,
                      quant_max: int, elements_per_scale: int) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with learnable ``scale`` (and ``zero_point``, None: fixed at 0).

    ``scale``/``zero_point`` broadcast against ``x``. Gradients reach ``x`` (straight through
    inside the range), ``scale`` and a learnable ``zero_point`` (scaled by ``1/sqrt(K*qmax)``).
    """
    factor = 1.0 / (max(elements_per_scale, 1) * max(quant_max, 1)) ** 0.5
    s = _grad_scale(scale, factor)
    if zero_point is None:
        q = _round_pass(x / s).clamp(quant_min, quant_max)
        return q * s
    z = _round_pass(zero_point)
    if zero_point.requires_grad:
        z = _grad_scale(z, factor)
    q = _round_pass(x / s + z).clamp(quant_min, quant_max)
    return (q - z) * s


def _tidy_(scale: nn.Parameter, zero_point: nn.Parameter, quant_min: int, quant_max: int, free_zero: bool) -> None:
    """coremltools' in-place fixes before each use: scale >= eps, a free zero point integral and in range."""
    with torch.no_grad():
        scale.clamp_(min=_EPS)
        if free_zero:
            zero_point.round_().clamp_(quant_min, quant_max)


class LearnableWeightFakeQuantize(WeightFakeQuantize):
    """A weight's fake quantizer whose per-group ``scale`` (and ``zero_point``) are Parameters.

    ``weight``: the weight (or bn-folded weight) it starts from: the qparams are initialised
    from its range, so they exist before the first forward (an optimizer built right after
    ``prepare`` sees them). ``observer_enabled`` (the milestones): re-initialise from the
    current weight at every forward.
    """

    learnable = True

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, channel_axis: int = 0, input_axis: int = 1):
        super().__init__(spec, channel_axis, input_axis)
        scale, zp = WeightFakeQuantize.qparams(self, weight)
        base_zp = self.scheme.qparams(torch.zeros(1), torch.ones(1), spec.dtype)[1]
        self.has_zero_point = base_zp is not None
        self.free_zero = self.has_zero_point and self.scheme.name != "symmetric"
        self.scale = nn.Parameter(scale.clone())
        self.zero_point = nn.Parameter(zp.float().clone(), requires_grad=self.free_zero)
        self.observer_enabled = True

    def observe(self, weight: torch.Tensor) -> None:
        """Set ``scale``/``zero_point`` from ``weight``'s current range."""
        scale, zp = WeightFakeQuantize.qparams(self, weight)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zp.float())

    def qparams(self, weight: torch.Tensor | None = None):
        """The learned ``(scale [G], zero_point [G] int32)`` (``weight`` is ignored)."""
        _tidy_(self.scale, self.zero_point, self.quant_min, self.quant_max, self.free_zero)
        return self.scale.detach().float().clone(), self.zero_point.detach().round().to(torch.int32)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.observe(weight)
        if not self.fake_quant_enabled:
            return weight
        _tidy_(self.scale, self.zero_point, self.quant_min, self.quant_max, self.free_zero)
        sizes = self.block_sizes(weight.shape)
        groups = to_groups(weight, sizes)
        zp = self.zero_point.reshape(-1, 1) if self.has_zero_point else None
        fq = lsq_fake_quantize(groups, self.scale.reshape(-1, 1).to(groups.dtype), zp, self.quant_min,
                               self.quant_max, groups.shape[1])
        return from_groups(fq, tuple(weight.shape), sizes)

    def record_scheme(self):
        """The scheme ``finalize`` quantizes with: the spec's, with the learned qparams."""
        scale, zp = self.qparams()
        return FixedQParams(self.scheme, scale, zp if self.has_zero_point else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learnable, observer={self.observer_enabled}"


class FixedQParams:
    """A scheme plugin's stand-in whose ``qparams`` returns given per-group values (in group
    order, chunk by chunk as the quantizer asks); everything else is the wrapped scheme's."""

    def __init__(self, scheme, scale: torch.Tensor, zero_point: torch.Tensor | None):
        self._scheme = scheme
        self._scale, self._zero_point = scale, zero_point
        self._cursor = 0

    def __getattr__(self, name: str):
        return getattr(self._scheme, name)

    def qparams(self, min_val, max_val, dtype):
        n = int(min_val.shape[0])
        start, self._cursor = self._cursor, self._cursor + n
        scale = self._scale[start:start + n].to(min_val.dtype)
        zp = None if self._zero_point is None else self._zero_point[start:start + n].to(min_val.dtype)
        return scale, zp


class LearnableActivationFakeQuantize(ActivationFakeQuantize):
    """An activation's fake quantizer (per tensor) with a learnable ``scale`` and ``zero_point``."""

    learnable = True

    def __init__(self, observer: nn.Module, scheme_name: str, dtype: QuantDtype, site: str = ""):
        super().__init__(observer, scheme_name, dtype, site)
        del self._buffers["scale"], self._buffers["zero_point"]
        base_zp = self.scheme.qparams(torch.zeros(1), torch.ones(1), dtype)[1]
        self.free_zero = base_zp is not None and self.scheme.name != "symmetric"
        self.scale = nn.Parameter(torch.ones(1))
        self.zero_point = nn.Parameter(torch.zeros(1) if base_zp is None else base_zp.float().reshape(1),
                                       requires_grad=self.free_zero)

    def qparams(self) -> tuple[float, int]:
        """The learned ``(scale, zero_point)`` as Python numbers (observed values until learning starts)."""
        if self._stale:
            self.update_qparams()
        _tidy_(self.scale, self.zero_point, self.quant_min, self.quant_max, self.free_zero)
        return float(self.scale.detach()), int(round(float(self.zero_point.detach())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.observer(x.detach())
            self.update_qparams()  # coremltools copies the observed qparams at every observed forward
        if not self.fake_quant_enabled:
            return x
        if self._stale:
            self.update_qparams()
        _tidy_(self.scale, self.zero_point, self.quant_min, self.quant_max, self.free_zero)
        return lsq_fake_quantize(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.quant_min,
                                 self.quant_max, x.numel())
