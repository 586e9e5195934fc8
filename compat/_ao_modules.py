"""torch.ao-compatible modules for compat's ``LinearQuantizer`` (quanta's, not coremltools').

- :class:`EMAMinMaxObserver` / :class:`EMAPerChannelMinMaxObserver`: coremltools'
  ``ema_min_max`` observer (an exponential moving average of min/max with ``ema_ratio`` 0.9) as
  torch.ao moving-average observers with constant ``1 - ema_ratio``; ``synchronize`` (coremltools'
  switch for reducing min/max across processes) all-reduces them when torch.distributed is
  initialised.
- :class:`LearnableFakeQuantize`: LSQ fake quantization (:func:`quanta.fx.learnable.lsq_fake_quantize`,
  the arithmetic of coremltools' ``LearnableFakeQuantize``) as a torch.ao ``FakeQuantizeBase``:
  ``scale``/``zero_point`` are Parameters set from the observer while it is enabled and learned after.
- :class:`FloatObserver`: a no-op observer that leaves a tensor float (torch.ao's
  ``NoopObserver`` taking the ``factory_kwargs`` QAT modules pass to weight observers).
- QAT ``ConvTranspose1d/2d/3d``: torch.ao has none; these fake-quantize the weight (per channel
  along axis 1, the output channels of a transposed conv) and convert to torch.ao's reference
  ``ConvTranspose`` modules.
"""

from __future__ import annotations

import torch
import torch.ao.quantization as aoq
import torch.nn.functional as F
from torch import nn

from quanta.fx.learnable import lsq_fake_quantize

__all__ = ["EMAMinMaxObserver", "EMAPerChannelMinMaxObserver", "LearnableFakeQuantize", "FloatObserver",
           "QAT_CONV_TRANSPOSE", "is_symmetric"]

_EPS = float(torch.finfo(torch.float32).eps)


def is_symmetric(qscheme) -> bool:
    """Whether a torch qscheme is symmetric."""
    return qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def _all_reduce(t: torch.Tensor, op) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op)


class _Synchronized:
    synchronize: bool = True

    def calculate_qparams(self):  # type: ignore[override]
        if self.synchronize:
            _all_reduce(self.min_val.data, torch.distributed.ReduceOp.MIN)
            _all_reduce(self.max_val.data, torch.distributed.ReduceOp.MAX)
        return super().calculate_qparams()


class EMAMinMaxObserver(_Synchronized, aoq.MovingAverageMinMaxObserver):
    """coremltools' ``ema_min_max`` observer, per tensor (moving average with ``1 - ema_ratio``)."""

    def __init__(self, ema_ratio: float = 0.9, **kwargs):
        kwargs.pop("ch_axis", None)
        kwargs.pop("factory_kwargs", None)
        super().__init__(averaging_constant=1.0 - ema_ratio, **kwargs)
        self.ema_ratio = ema_ratio
        self.synchronize = True


class EMAPerChannelMinMaxObserver(_Synchronized, aoq.MovingAveragePerChannelMinMaxObserver):
    """coremltools' ``ema_min_max`` observer, per channel."""

    def __init__(self, ema_ratio: float = 0.9, **kwargs):
        kwargs.pop("factory_kwargs", None)
        super().__init__(averaging_constant=1.0 - ema_ratio, **kwargs)
        self.ema_ratio = ema_ratio
        self.synchronize = True


class FloatObserver(aoq.NoopObserver):
    """Leaves the tensor float (accepts ``factory_kwargs``, which QAT modules pass to weight observers)."""

    def __init__(self, dtype: torch.dtype = torch.float, custom_op_name: str = "", factory_kwargs=None):
        super().__init__(dtype, custom_op_name)


class LearnableFakeQuantize(aoq.FakeQuantizeBase):
    """LSQ fake quantization with learnable ``scale`` (and ``zero_point`` when affine).

    Built like torch.ao's ``FakeQuantize`` (``observer``, ``quant_min``, ``quant_max`` and the
    observer's keyword arguments). While ``observer_enabled``, every forward sets the qparams from
    the observer; after, they are learned. Per-channel instances get their parameter shape from
    :meth:`set_param_shape` (compat calls it after prepare, so an optimizer built then sees them).
    """

    def __init__(self, observer=aoq.MovingAverageMinMaxObserver, quant_min: int | None = None,
                 quant_max: int | None = None, **observer_kwargs):
        super().__init__()
        if quant_min is not None:
            observer_kwargs["quant_min"], observer_kwargs["quant_max"] = quant_min, quant_max
        self.activation_post_process = observer(**observer_kwargs)
        app = self.activation_post_process
        self.quant_min, self.quant_max = int(app.quant_min), int(app.quant_max)
        self.dtype, self.qscheme = app.dtype, app.qscheme
        self.ch_axis = int(getattr(app, "ch_axis", -1)) if aoq.utils.is_per_channel(self.qscheme) else -1
        self.free_zero = not is_symmetric(self.qscheme)
        self.scale = nn.Parameter(torch.ones(1))
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=self.free_zero)

    def set_param_shape(self, shape) -> None:
        """Size ``scale``/``zero_point`` for a weight of ``shape`` (one per channel along ``ch_axis``)."""
        if self.ch_axis < 0:
            return
        n = int(shape[self.ch_axis])
        self.scale = nn.Parameter(torch.ones(n, device=self.scale.device))
        self.zero_point = nn.Parameter(torch.zeros(n, device=self.scale.device), requires_grad=self.free_zero)

    def _observe(self, x: torch.Tensor) -> None:
        self.activation_post_process(x.detach())
        scale, zp = self.activation_post_process.calculate_qparams()
        scale, zp = scale.to(self.scale.device).reshape(-1), zp.to(self.scale.device).reshape(-1).float()
        with torch.no_grad():
            if self.scale.shape != scale.shape:
                self.scale = nn.Parameter(scale.clone())
                self.zero_point = nn.Parameter(zp.clone(), requires_grad=self.free_zero)
            else:
                self.scale.copy_(scale)
                self.zero_point.copy_(zp)

    def _tidy(self) -> None:
        with torch.no_grad():
            self.scale.clamp_(min=_EPS)
            if self.free_zero:
                self.zero_point.round_().clamp_(self.quant_min, self.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1:
            self._observe(x)
        if self.fake_quant_enabled[0] != 1:
            return x
        self._tidy()
        shape = [1] * x.dim()
        if self.ch_axis >= 0:
            shape[self.ch_axis] = -1
            elements = x.numel() // max(x.shape[self.ch_axis], 1)
        else:
            elements = x.numel()
        scale = self.scale.reshape(shape).to(x.dtype)
        zp = self.zero_point.reshape(shape) if self.free_zero else (
            None if not self.zero_point.abs().sum() else self.zero_point.reshape(shape).detach())
        return lsq_fake_quantize(x, scale, zp, self.quant_min, self.quant_max, elements)

    @torch.jit.export
    def calculate_qparams(self):  # type: ignore[override]
        """The learned ``(scale, zero_point)`` (zero point rounded, int)."""
        self._tidy()
        scale = self.scale.detach().clone()
        zp = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).to(torch.int32)
        if self.ch_axis < 0:
            return scale.reshape(1), zp.reshape(1)
        return scale, zp

    def extra_repr(self) -> str:
        return (f"dtype={self.dtype}, qscheme={self.qscheme}, quant_min={self.quant_min}, quant_max={self.quant_max}, "
                f"ch_axis={self.ch_axis}, learnable")


class _ConvTransposeQAT:
    """QAT ConvTranspose: the weight goes through ``weight_fake_quant`` (from the qconfig)."""

    _FLOAT_MODULE: type
    _FLOAT_LAYER: type
    _DIMS: int

    def _init_qat(self, qconfig) -> None:
        self.qconfig = qconfig
        fq = qconfig.weight(factory_kwargs={"device": self.weight.device})
        if getattr(fq, "ch_axis", -1) == 0:  # per channel: a transposed conv's output channels are axis 1
            fq.ch_axis = 1
            if hasattr(fq, "activation_post_process") and hasattr(fq.activation_post_process, "ch_axis"):
                fq.activation_post_process.ch_axis = 1
        self.weight_fake_quant = fq

    def forward(self, input, output_size=None):  # type: ignore[override]
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              self._DIMS, self.dilation)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self._DIMS - 1]
        return fn(input, self.weight_fake_quant(self.weight), self.bias, self.stride, self.padding, output_padding,
                  self.groups, self.dilation)

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant: bool = False):
        """The QAT module of a float ConvTranspose (shares its parameters)."""
        qat = cls.__new__(cls)
        qat.__dict__.update(mod.__dict__)
        qat._parameters = dict(mod._parameters)
        qat._buffers = dict(mod._buffers)
        qat._modules = dict(mod._modules)
        qat._init_qat(mod.qconfig)
        return qat

    def to_float(self):
        """The float ConvTranspose with this module's parameters."""
        plain = self._FLOAT_LAYER.__new__(self._FLOAT_LAYER)
        plain.__dict__.update(self.__dict__)
        plain._parameters = dict(self._parameters)
        plain._buffers = dict(self._buffers)
        plain._modules = {k: v for k, v in self._modules.items() if k != "weight_fake_quant"}
        plain.__dict__.pop("qconfig", None)
        return plain


class ConvTranspose1d(_ConvTransposeQAT, nn.ConvTranspose1d):
    """QAT ``ConvTranspose1d``."""

    _FLOAT_MODULE = _FLOAT_LAYER = nn.ConvTranspose1d
    _DIMS = 1


class ConvTranspose2d(_ConvTransposeQAT, nn.ConvTranspose2d):
    """QAT ``ConvTranspose2d``."""

    _FLOAT_MODULE = _FLOAT_LAYER = nn.ConvTranspose2d
    _DIMS = 2


class ConvTranspose3d(_ConvTransposeQAT, nn.ConvTranspose3d):
    """QAT ``ConvTranspose3d``."""

    _FLOAT_MODULE = _FLOAT_LAYER = nn.ConvTranspose3d
    _DIMS = 3


#: float ConvTranspose class -> its QAT class
QAT_CONV_TRANSPOSE = {nn.ConvTranspose1d: ConvTranspose1d, nn.ConvTranspose2d: ConvTranspose2d,
                      nn.ConvTranspose3d: ConvTranspose3d}
