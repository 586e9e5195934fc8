"""The autograd functions of the fake-quantization modules, and a cheaper way to call them.

A training step calls these once per quantizer, where Python's own overhead is a large part of
the cost on small tensors: :func:`fast_apply` goes straight to torch's C++ ``Function.apply``
where ``torch.autograd.Function.apply``'s Python wrapper would do nothing (no ``setup_context``,
no functorch transform active, no functorch wrapper among the arguments).
"""

from __future__ import annotations

from typing import Any

import torch

from ._reuse import _MaskWorkspace, _Reusable

__all__: list[str] = []

_functorch = getattr(torch._C, "_functorch", None)
#: torch's check for a functorch-wrapped tensor and whether any transform is active (private
#: functions of torch 2.x; where a release lacks one, every call takes Function.apply).
_IS_WRAPPED = getattr(_functorch, "is_functorch_wrapped_tensor", None)
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _c_apply(cls: type) -> "object | None":
    # The C++ apply that Function.apply ends in (a built-in method bound to cls), or None.
    try:
        got = super(torch.autograd.Function, cls).apply  # type: ignore[misc]
    except AttributeError:
        return None
    if _IS_WRAPPED is None or _TRANSFORMS_ACTIVE is None or type(got).__name__ != "builtin_function_or_method":
        return None
    return got


def fast_apply(cls: type, *args: Any) -> Any:
    """``cls.apply(*args)`` for an autograd function without ``setup_context``: torch's C++ apply
    directly where ``Function.apply`` would call it with the same arguments (no functorch
    transform active, no tensor argument a functorch wrapper), else ``Function.apply``."""
    c_apply = _C_APPLY.get(cls)
    if c_apply is None or _TRANSFORMS_ACTIVE():
        return cls.apply(*args)
    for arg in args:
        if isinstance(arg, torch.Tensor) and _IS_WRAPPED(arg):
            return cls.apply(*args)
    return c_apply(*args)


class _FakeQuantizeActivation(torch.autograd.Function):
    """:class:`_FakeQuantize`'s per-tensor path with a workspace (an activation quantizer's, each
    step), in a Function of its own: six arguments, not nine, and no branching on the group forms
    (a step calls it once per activation, where Python's overhead is most of the cost). The same
    operations as that path, bit for bit."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, lo: int, hi: int, workspace: "_MaskWorkspace"):
        ctx.workspace = workspace
        codes = torch.div(x, scale, out=workspace.take(x)).round_()
        y = torch.clamp(codes, lo, hi, out=workspace.output.take(x))
        ctx.save_for_backward(torch.eq(y, codes, out=codes))
        workspace.hold(ctx)
        if not zero_point:
            return y.mul_(scale)
        if y.dtype == torch.float32:
            return torch.add(workspace.zero(y), y, alpha=scale, out=y)
        return y.mul_(scale).add_(0.0)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if not torch.is_grad_enabled() and grad.stride() == mask.stride():
            return torch.mul(grad, mask, out=ctx.workspace.grad.take(grad)), None, None, None, None, None
        return grad * mask, None, None, None, None, None


class _FakeQuantize(torch.autograd.Function):
    """Fake quantization with a straight-through gradient, exactly the scheme's arithmetic
    (``round(x / scale) + zero_point``, clamped, back to float): per tensor (a float ``scale``, an
    int ``zero_point`` or None) or on a ``[G, K]`` group view (``[G, 1]`` ``scale``/``zero_point``).

    On CPU torch's fused ``fake_quantize_per_tensor_affine`` kernel took about twice as long
    (fwd + bwd, 2M elements: 7.4 ms against 4.0 ms here), and ``fake_quantize_per_channel_affine``
    about 25 ms per call for a 784 x 512 weight under load (over half of an MLP's QAT step); this
    is a few passes, and a float 0/1 mask saved for the backward pass when any code clamped.
    Per tensor with a ``workspace`` (:class:`_MaskWorkspace`: the output, mask and gradient in the
    last step's buffers where that is safe), :class:`_FakeQuantizeActivation` does this.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min: int, quant_max: int, rarely_clamps: bool = False,
                out: "_Reusable | None" = None, clamps: bool | None = None):
        if out is not None and x.is_floating_point():
            q = torch.div(x, scale, out=out.take(x)).round_()
        else:
            q = torch.div(x, scale).round_()
        if isinstance(zero_point, int):
            # Per tensor without a workspace: the zero point folded into the clamp bounds; adding
            # 0.0 gives the 0.0 that ``(q + zp) - zp`` gave for a code of -0.0.
            ctx.clamps = True
            lo, hi = quant_min - zero_point, quant_max - zero_point
            clamped = q.clamp(lo, hi)
            ctx.save_for_backward(torch.eq(clamped, q, out=q))
            return clamped.mul_(scale).add_(0.0) if zero_point else clamped.mul_(scale)
        if zero_point is not None:
            q.add_(zero_point)
        # A weight's qparams come from its own range, so its codes rarely leave the integer
        # range: one min/max pass then shows the clamp, the mask and the backward's product
        # are no-ops (the same values, bit for bit), and they are skipped. NaN fails the test.
        if clamps is None:
            clamps = True
            if rarely_clamps and q.numel():
                lo, hi = torch.aminmax(q)
                clamps = not (float(lo) >= quant_min and float(hi) <= quant_max)
        ctx.clamps = clamps
        if clamps:
            # The mask: 1.0 where clamping changed nothing (NaN: 0.0), written over the unclamped
            # codes. A float mask, not a bool one: on CPU ``eq`` into bool and ``grad * bool`` took
            # about 5x and 20x as long as into and by float, for the same products bit for bit.
            clamped = q.clamp(quant_min, quant_max)
            ctx.save_for_backward(torch.eq(clamped, q, out=q))
            q = clamped
        if zero_point is not None:
            q.sub_(zero_point)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.clamps:
            return grad, None, None, None, None, None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None, None, None


class _DivideChannels(torch.autograd.Function):
    """``y.div_(factor)`` (``factor`` a constant) whose backward, ``grad / factor`` as autograd's,
    writes into a :class:`_Reusable` buffer: no fresh activation-sized memory per step."""

    @staticmethod
    def forward(ctx, y, factor, buffer: _Reusable):
        ctx.factor, ctx.buffer = factor, buffer
        ctx.mark_dirty(y)
        return y.div_(factor)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled() or not grad.is_contiguous() or not grad.is_floating_point():
            return grad / ctx.factor, None, None
        return torch.div(grad, ctx.factor, out=ctx.buffer.take(grad)), None, None


_C_APPLY = {cls: _c_apply(cls) for cls in (_FakeQuantizeActivation, _FakeQuantize, _DivideChannels)}
