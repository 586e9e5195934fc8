"""Fake-quantization modules: weights (any granularity), activations (per tensor), and the
training-time forms of Linear, Conv and Conv+BatchNorm that use them.

Forward passes are a few in-place tensor passes (weights per group, activations per tensor)
whose gradient is the straight-through estimator (1 inside the integer range, 0 where values
clamp); torch's fused ``fake_quantize_*_affine`` CPU kernels were slower. Qparams come from the
scheme plugins, and a fake-quantized value equals ``scheme.dequantize(scheme.quantize(x))``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from quanta._records.qmath import from_groups, to_groups
from quanta._records.spec import QuantDtype, QuantSpec
from quanta._run.weights import observer_for, resolve_scheme, scheme_for

from ._functions import _DivideChannels, _FakeQuantize, _FakeQuantizeActivation, fast_apply
from ._reuse import _MaskWorkspace, _Reusable

__all__ = ["WeightFakeQuantize", "ActivationFakeQuantize", "QuantLinear", "QuantConv1d", "QuantConv2d",
           "QuantConv3d", "ConvBnQAT", "QAT_WEIGHTED", "to_qat_module"]


class _WeightPlan(NamedTuple):
    # What a weight quantizer's forward needs that depends only on the weight's shape and dtype
    # and on its plugins: the block sizes, the [G, K] group shape (None: the weight is already
    # [G, K]), whether that is a plain reshape, whether the clamp check uses the exact ranges.
    sizes: list[int]
    rows: tuple[int, ...] | None
    plain: bool
    exact: bool
    observer: object
    scheme: object


class WeightFakeQuantize(nn.Module):
    """Fake-quantizes a weight with a :class:`QuantSpec` (per-tensor, per-channel or per-block).

    The range is taken from the current weight at every forward (what ``finalize`` records),
    through the spec's observer and scheme plugins. ``fake_quant_enabled`` switches it off
    (identity). ``forward(w)``: ``w``'s shape in, same shape out.
    """

    def __init__(self, spec: QuantSpec, channel_axis: int = 0, input_axis: int = 1):
        super().__init__()
        self.spec = spec
        self.channel_axis, self.input_axis = channel_axis, input_axis
        self.scheme = scheme_for(spec)
        self.observer = observer_for(spec)
        self.quant_min, self.quant_max = self.scheme.quant_range(spec.dtype)
        self.fake_quant_enabled = True
        self._sizes: dict[tuple, list[int]] = {}
        self._out = _Reusable()  # the fake-quantized weight's memory, reused while nothing holds it

    def block_sizes(self, shape) -> list[int]:
        shape = tuple(shape)
        if shape not in self._sizes:
            self._sizes[shape] = self.spec.block_sizes(shape, self.channel_axis, self.input_axis)
        return self._sizes[shape]

    def _scheme_qparams(self, weight: torch.Tensor, ranges: bool = False):
        # (scale [G] float32, zero point [G] int32 or None: the scheme has none[, (lo, hi) [G]])
        sizes = self.block_sizes(weight.shape)
        with torch.no_grad():
            groups = to_groups(weight.float(), sizes)
            lo, hi = self.observer.observe(groups, self.spec, self.scheme)
            scale, zp = self.scheme.qparams(lo, hi, self.spec.dtype)
        scale, zp = scale.float(), None if zp is None else zp.to(torch.int32)
        return (scale, zp, lo, hi) if ranges else (scale, zp)

    def qparams(self, weight: torch.Tensor):
        """``(scale [G], zero_point [G] int32)`` of the current weight, one entry per group."""
        scale, zp = self._scheme_qparams(weight)
        return scale, torch.zeros_like(scale, dtype=torch.int32) if zp is None else zp

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return weight
        plan = self._plans.get((weight.shape, weight.dtype)) if "_plans" in self.__dict__ else None
        if plan is None or plan.observer is not self.observer or plan.scheme is not self.scheme:
            plan = self._plan(weight)
        # The same operations as _scheme_qparams + fake_quantize_per_group, with what depends only on
        # the weight's shape and the plugins worked out once (a step runs this once per weight).
        shape = weight.shape
        groups = weight if plan.rows is None else weight.reshape(plan.rows) if plan.plain else \
            to_groups(weight, plan.sizes)
        values = groups.detach()
        if values.dtype != torch.float32:
            values = values.float()
        lo, hi = self.observer.observe(values, self.spec, self.scheme)
        scale, zp = self.scheme.qparams(lo, hi, self.spec.dtype)
        scale = scale.reshape(-1, 1)
        if scale.dtype != groups.dtype:
            scale = scale.float().to(groups.dtype)
        if zp is not None:
            zp = zp.to(torch.int32)
            zp = zp.reshape(-1, 1).to(groups.dtype) if bool(zp.any()) else None
        clamps = None
        if plan.exact:
            clamps = _range_clamps(lo, hi, scale, zp, self.quant_min, self.quant_max, groups.dtype)
        fq = fast_apply(_FakeQuantize, groups, scale, zp, self.quant_min, self.quant_max, True,
                        self.__dict__.get("_out"), clamps)
        return fq if plan.rows is None else fq.reshape(shape) if plan.plain else \
            from_groups(fq, tuple(shape), plan.sizes)

    def _plan(self, weight: torch.Tensor) -> "_WeightPlan":
        sizes = self.block_sizes(weight.shape)
        probe = torch.empty(weight.shape, device="meta")
        view = to_groups(probe, sizes)
        # A plain reshape (no permute): to_groups returned a contiguous view of the probe.
        plain = view._base is probe and view.is_contiguous()
        rows = None if plain and view.shape == weight.shape else tuple(view.shape)
        exact = weight.numel() >= _RANGE_CHECK_MIN and _declares(self.observer, "exact_ranges", "observe")
        plan = _WeightPlan(sizes, rows, plain, exact, self.observer, self.scheme)
        self.__dict__.setdefault("_plans", {})[(weight.shape, weight.dtype)] = plan
        return plan

    def record_scheme(self):
        """The scheme ``finalize`` records the weight with (None: the spec's, from the weight's range)."""
        return None

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, fake_quant={self.fake_quant_enabled}"


def fake_quantize_per_group(groups: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                            quant_min: int, quant_max: int, out: "_Reusable | None" = None,
                            ranges: "tuple[torch.Tensor, torch.Tensor] | list | None" = None) -> torch.Tensor:
    """Fake-quantize ``groups`` ``[G, K]`` with ``scale``/``zero_point`` ``[G]``; gradient passes
    where the code was in range (none to the qparams, which come from the weight's range).
    ``ranges``: each group's exact ``(min, max)`` ``[G]``, from which whether any code clamps is
    known without a pass over the codes; ``out``: a :class:`_Reusable` for the result's memory."""
    scale = scale.reshape(-1, 1).to(groups.dtype)
    zp = None if zero_point is None or not bool(zero_point.any()) else zero_point.reshape(-1, 1).to(groups.dtype)
    clamps = None
    if ranges is not None:
        clamps = _range_clamps(ranges[0], ranges[1], scale, zp, quant_min, quant_max, groups.dtype)
    return _FakeQuantize.apply(groups, scale, zp, int(quant_min), int(quant_max), True, out, clamps)


def _range_clamps(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                  quant_min: int, quant_max: int, dtype: torch.dtype) -> bool:
    # Division by a positive scale, rounding and adding a zero point never reverse an order, so a
    # group's smallest and largest codes are those of its minimum and maximum: computed on [G, 2]
    # with the same ops as on the weight, they show whether any code clamps. NaN: clamps.
    # Clamped ends equal to the ends: nothing clamps (NaN never equals; an inf end clamps).
    with torch.no_grad():
        ends = torch.stack([lo, hi], 1)
        if ends.dtype != dtype:
            ends = ends.to(dtype)
        ends.div_(scale).round_()
        if zp is not None:
            ends.add_(zp)
        return not torch.equal(ends, ends.clamp(quant_min, quant_max))


#: Weights of this many values or more take the clamp check from their ranges (below, one
#: pass over the codes costs less than the few ops on [G, 2]).
_RANGE_CHECK_MIN = 16384


def _declares(plugin, flag: str, method: str) -> bool:
    """Whether ``plugin``'s ``flag`` is true on the class that defines its ``method`` (a subclass
    overriding the method alone does not inherit the declaration)."""
    cls = type(plugin)
    owner = _defining_class(cls, method)
    return bool(owner is not None and flag in owner.__dict__ and owner.__dict__[flag])


def fake_quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                             workspace: "_MaskWorkspace | None" = None):
    """Fake-quantize ``x`` (any shape) per tensor; gradient passes where the code was in range.
    ``workspace``: a :class:`_MaskWorkspace` whose mask buffer is reused while no graph holds it."""
    zero_point = int(zero_point)
    if workspace is not None and x.is_floating_point():
        return _FakeQuantizeActivation.apply(x, float(scale), zero_point, int(quant_min) - zero_point,
                                             int(quant_max) - zero_point, workspace)
    return _FakeQuantize.apply(x, float(scale), zero_point, int(quant_min), int(quant_max))


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def _has_scalar_qparams(scheme) -> bool:
    """Whether the class defining the scheme's ``qparams`` defines ``qparams_scalar`` too (a
    subclass that overrides ``qparams`` alone keeps its own arithmetic)."""
    owner = _defining_class(type(scheme), "qparams_scalar")
    return owner is not None and owner is _defining_class(type(scheme), "qparams")


class ActivationFakeQuantize(nn.Module):
    """Observes and fake-quantizes one activation, per tensor.

    Holds a streaming observer (``observer``: ``forward(x)`` updates ``min_val``/``max_val``),
    the scheme plugin and the activation ``dtype``. Two switches, set by the milestones:
    ``observer_enabled`` and ``fake_quant_enabled``. ``forward(x)``: any shape, same shape out.
    ``site`` names the op whose output (or input) this is, for messages.
    """

    #: Declares that this module quantizes activations (saving refuses it: its tensors do not hold that).
    quantizes_activations = True

    def __init__(self, observer: nn.Module, scheme_name: str, dtype: QuantDtype, site: str = ""):
        super().__init__()
        self.observer = observer
        self.scheme_name = scheme_name
        self.scheme = resolve_scheme(scheme_name)
        self.dtype = dtype
        self.site = site
        self.quant_min, self.quant_max = self.scheme.quant_range(dtype)
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self._stale = True
        self._workspace = _MaskWorkspace()
        self._scalar = _has_scalar_qparams(self.scheme)

    @property
    def qscheme(self) -> torch.qscheme:
        """torch's name for the scheme: ``torch.per_tensor_symmetric`` for ``symmetric``, else
        ``torch.per_tensor_affine`` (as on torch.ao's observers)."""
        return torch.per_tensor_symmetric if self.scheme.name == "symmetric" else torch.per_tensor_affine

    @property
    def observed(self) -> bool:
        return math.isfinite(float(self.observer.min_val)) and math.isfinite(float(self.observer.max_val))

    def update_qparams(self) -> None:
        """Recompute ``scale``/``zero_point`` from the observer's range (scheme plugin)."""
        self._update()

    def _update(self) -> tuple[float, int] | None:
        # The scheme's qparams_scalar (Python floats: a few dispatched ops fewer per step) when the
        # class that defines its qparams defines it too (a subclass overriding qparams alone is not
        # second-guessed), else qparams on one-element tensors. None: nothing observed yet.
        # (A training step runs this once per activation: plain dict look-ups, not nn.Module's.)
        d = self.__dict__
        observer = d["_modules"]["observer"]
        min_val, max_val = observer.min_val, observer.max_val
        lo, hi = float(min_val), float(max_val)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        got = self.scheme.qparams_scalar(lo, hi, self.dtype) if d.get("_scalar") else None
        buffers = d["_buffers"]
        scale_t, zp_t = buffers.get("scale"), buffers.get("zero_point")
        if got is not None:
            scale, zp = got[0], 0 if got[1] is None else int(got[1])
            if scale_t is not None and zp_t is not None and not (scale_t.requires_grad or zp_t.requires_grad):
                scale_t.fill_(scale)
                zp_t.fill_(zp)
            else:
                with torch.no_grad():  # (no_grad: the learnable subclass's qparams are Parameters)
                    self.scale.fill_(scale)
                    self.zero_point.fill_(zp)
        else:
            with torch.no_grad():
                t_scale, t_zp = self.scheme.qparams(min_val.reshape(1), max_val.reshape(1), self.dtype)
                self.scale.copy_(t_scale)
                if t_zp is None:
                    self.zero_point.zero_()
                else:
                    self.zero_point.copy_(t_zp)
            scale, zp = float(self.scale), int(self.zero_point)
        d["_stale"] = False  # a plain attribute: nn.Module.__setattr__'s checks cost a step
        return scale, zp

    def qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` as Python numbers, as the finalized graph uses them."""
        if self._stale:
            got = self._update()
            if got is not None:
                return got
        return float(self.scale), int(self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.__dict__
        if self.observer_enabled:
            d["_modules"]["observer"](x)
            d["_stale"] = True
        if not self.fake_quant_enabled:
            return x
        got = self._update() if d["_stale"] else None
        scale, zero_point = got if got is not None else (float(self.scale), int(self.zero_point))
        workspace = d.get("_workspace")
        if workspace is None or not x.is_floating_point():
            return fake_quantize_per_tensor(x, scale, zero_point, self.quant_min, self.quant_max, workspace)
        return fast_apply(_FakeQuantizeActivation, x, scale, zero_point, self.quant_min - zero_point,
                          self.quant_max - zero_point, workspace)

    def extra_repr(self) -> str:
        return (f"{self.dtype} {self.scheme_name}, observer={self.observer_enabled}, "
                f"fake_quant={self.fake_quant_enabled}, site={self.site!r}")


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight (same Parameters as the original)."""

    weight_fake_quant: WeightFakeQuantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)


class _QuantConvMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized weight."""


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight."""


class QuantConv3d(_QuantConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with a fake-quantized weight."""


#: float type -> training form.
QAT_WEIGHTED = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}


def to_qat_module(module: nn.Module, spec: QuantSpec, weight_fq: WeightFakeQuantize | None = None) -> nn.Module:
    """The training form of a Linear/Conv sharing ``module``'s Parameters (no copy of the weight);
    ``weight_fq``: its weight quantizer (default: a :class:`WeightFakeQuantize` of ``spec``)."""
    cls = QAT_WEIGHTED[type(module)]
    qat = cls.__new__(cls)
    qat.__dict__.update(module.__dict__)
    # Fresh containers: the original module keeps its own (the user's model is not rewired).
    qat._parameters = dict(module._parameters)
    qat._buffers = dict(module._buffers)
    qat._modules = dict(module._modules)
    qat.weight_fake_quant = weight_fq if weight_fq is not None else WeightFakeQuantize(spec, 0, 1)
    return qat


class ConvBnQAT(nn.Module):
    """Conv followed by BatchNorm, folded for training (the exported weight includes the bn).

    The weight is fake-quantized after scaling by ``gamma / sqrt(running_var + eps)``. While
    training with ``freeze_bn`` off, the bn still uses batch statistics (the conv output is
    rescaled back first) and updates its running statistics. With ``freeze_bn`` on, or in
    eval mode, the forward is exactly the folded conv that ``finalize`` writes.
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, spec: QuantSpec, weight_fq: WeightFakeQuantize | None = None):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.freeze_bn = False
        self.weight_fake_quant = weight_fq if weight_fq is not None else WeightFakeQuantize(spec, 0, 1)

    @property
    def weight(self) -> torch.Tensor:
        """The conv's (unfolded) weight, as on torch.ao's fused ConvBn modules."""
        return self.conv.weight

    def _scale_factor(self) -> torch.Tensor:
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        return inv_std * bn.weight if bn.weight is not None else inv_std

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` of the equivalent plain conv (bn in inference mode)."""
        bn, conv = self.bn, self.conv
        factor = self._scale_factor()
        shape = [-1] + [1] * (conv.weight.dim() - 1)
        weight = conv.weight * factor.reshape(shape)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        bias = (bias - bn.running_mean) * factor
        if bn.bias is not None:
            bias = bias + bn.bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        wshape = [-1] + [1] * (conv.weight.dim() - 1)
        oshape = [1, -1] + [1] * (conv.weight.dim() - 2)
        if self.freeze_bn or not self.training:
            factor = self._scale_factor()
            weight = self.weight_fake_quant(conv.weight * factor.reshape(wshape))
            _, bias = self.folded()
            return conv._conv_forward(x, weight, None) + bias.reshape(oshape)
        # While bn uses batch statistics, the folding factor is a constant for the gradient:
        # scaling the weight by it and the output by its inverse cancel but for the rounding,
        # so gamma learns through the bn alone and the rescale costs one in-place pass (the
        # factor's own gradient would take several passes over the conv output).
        factor = self._scale_factor().detach()
        weight = self.weight_fake_quant(conv.weight * factor.reshape(wshape))
        y = conv._conv_forward(x, weight, None)
        grad_buffer = self.__dict__.get("_grad_buffer")
        if grad_buffer is None:
            grad_buffer = self.__dict__["_grad_buffer"] = _Reusable()
        y = fast_apply(_DivideChannels, y, factor.reshape(oshape), grad_buffer)
        if conv.bias is not None:
            y = y + conv.bias.reshape(oshape)
        return bn(y)

    def extra_repr(self) -> str:
        return f"freeze_bn={self.freeze_bn}"

