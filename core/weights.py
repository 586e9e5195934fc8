"""Quantizing one weight tensor with a spec, through the scheme and observer plugins."""

from __future__ import annotations

import torch

from .errors import QuantizationError
from .qmath import from_groups, scale_shape, to_groups
from .record import QuantizedWeight
from .spec import QuantSpec

__all__ = ["quantize_weight", "check_finite", "resolve_scheme", "resolve_observer"]


def resolve_scheme(name: str):
    """The scheme implementation registered as ``name``."""
    from quanta import registry

    return registry.get("scheme", name).obj


def resolve_observer(name: str):
    """The observer implementation registered as ``name``."""
    from quanta import registry

    return registry.get("observer", name).obj


def check_finite(weight: torch.Tensor, layer: str | None = None) -> None:
    """Raise QuantizationError naming ``layer`` if ``weight`` holds NaN or inf."""
    if not weight.dtype.is_floating_point:
        raise QuantizationError(f"expected a floating-point weight, got {weight.dtype}", layer)
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int(bad.sum()) - n_nan
        raise QuantizationError(
            f"weight has {n_nan} NaN and {n_inf} inf values; quantization needs finite weights", layer
        )


def quantize_weight(
    weight: torch.Tensor,
    spec: QuantSpec,
    *,
    channel_axis: int = 0,
    input_axis: int = 1,
    layer: str | None = None,
    scheme=None,
    observer=None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of one weight.

    Args:
        weight: float tensor of any shape (``[out, in, *kernel]`` for linear/conv layers).
        spec: dtype, scheme, granularity, block size and observer.
        channel_axis / input_axis: output and input axes of ``weight`` (ConvTranspose: 1 and 0).
        layer: name used in error messages.
        scheme / observer: implementations to use instead of looking ``spec``'s names up.

    Returns a :class:`QuantizedWeight` whose ``codes`` have ``weight``'s shape and whose
    ``scale``/``zero_point`` have ``scale_shape``. Computation is float32 on ``weight``'s device.
    """
    check_finite(weight, layer)
    scheme = scheme or resolve_scheme(spec.scheme)
    observer = observer or resolve_observer(spec.observer)
    w = weight.detach().to(torch.float32)
    sizes = spec.block_sizes(tuple(w.shape), channel_axis, input_axis, layer)
    groups = to_groups(w, sizes)
    lo, hi = observer.observe(groups, spec, scheme)
    scale, zero_point = scheme.qparams(lo, hi, spec.dtype)
    zp2 = None if zero_point is None else zero_point[:, None]
    codes = scheme.quantize(groups, scale[:, None], zp2, spec.dtype)
    storage = spec.dtype.torch_storage
    # Undo the grouping permutation: groups are [*kept dims, *reduced dims].
    codes = from_groups(codes, tuple(w.shape), sizes).to(storage)
    qshape = scale_shape(tuple(w.shape), sizes)
    return QuantizedWeight(
        codes=codes,
        scale=scale.reshape(qshape).to(torch.float32),
        zero_point=None if zero_point is None else zero_point.reshape(qshape).to(storage),
        spec=spec,
        block_sizes=tuple(sizes),
        channel_axis=channel_axis,
        input_axis=input_axis,
    )

