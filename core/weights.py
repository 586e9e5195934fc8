"""Quantizing one weight tensor with a spec, through the scheme and observer plugins."""

from __future__ import annotations

import torch

from .errors import QuantizationError
from .qmath import from_groups, scale_shape, to_groups
from .record import QuantizedWeight
from .spec import QuantSpec

__all__ = ["quantize_weight", "quantize_weight_with_values", "check_finite", "resolve_scheme", "resolve_observer"]


def resolve_scheme(name: str):
    """The scheme implementation registered as ``name``."""
    from quanta import registry

    return registry.get("scheme", name).obj


def resolve_observer(name: str):
    """The observer implementation registered as ``name``."""
    from quanta import registry

    return registry.get("observer", name).obj


def check_finite(weight: torch.Tensor, layer: str | None = None) -> None:
    """Raise QuantizationError naming ``layer`` if ``weight`` holds NaN or inf.

    One reduction (``aminmax`` propagates NaN and inf) on the fast path; counts only on error.
    """
    if not weight.dtype.is_floating_point:
        raise QuantizationError(f"expected a floating-point weight, got {weight.dtype}", layer)
    if weight.numel() == 0:
        return
    lo, hi = torch.aminmax(weight)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    n_nan = int(torch.isnan(weight).sum())
    n_inf = int(torch.isinf(weight).sum())
    raise QuantizationError(f"weight has {n_nan} NaN and {n_inf} inf values; quantization needs finite weights", layer)


def quantize_weight(
    weight: torch.Tensor,
    spec: QuantSpec,
    *,
    channel_axis: int = 0,
    input_axis: int = 1,
    layer: str | None = None,
    scheme=None,
    observer=None,
    compute_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Round-to-nearest quantization of one weight.

    Args:
        weight: float tensor of any shape (``[out, in, *kernel]`` for linear/conv layers).
        spec: dtype, scheme, granularity, block size and observer.
        channel_axis / input_axis: output and input axes of ``weight`` (ConvTranspose: 1 and 0).
        layer: name used in error messages.
        scheme / observer: implementations to use instead of looking ``spec``'s names up.
        compute_dtype: the float type the math runs in (float32; Core ML consts use their own fp16,
            as coremltools does, so that codes agree bit for bit).

    Returns a :class:`QuantizedWeight` whose ``codes`` have ``weight``'s shape and whose
    ``scale``/``zero_point`` have ``scale_shape`` (scales stored as float32).
    Computation runs on ``weight``'s device.
    """
    return quantize_weight_with_values(weight, spec, channel_axis=channel_axis, input_axis=input_axis,
                                       layer=layer, scheme=scheme, observer=observer, compute_dtype=compute_dtype)[0]


#: Elements per chunk when measuring the error: small temporaries instead of a weight-sized one.
_ERROR_CHUNK = 1 << 22


def quantize_weight_with_values(weight, spec, *, channel_axis=0, input_axis=1, layer=None, scheme=None,
                                observer=None, compute_dtype=torch.float32):
    """Like :func:`quantize_weight`, also returning the dequantized weight and the squared norms.

    Returns ``(record, dequantized [weight's shape, compute dtype], (‖W − Ŵ‖², ‖W‖²))``.
    Every step is a whole-tensor torch op on the grouped ``[G, K]`` view (no copy for Linear
    weights). Fresh memory is the expensive part on CPU (page faults), so only what is kept
    is allocated: one float buffer that becomes the dequantized weight, and the codes. Schemes
    with the optional in-place methods ``quantize_into``/``dequantize_`` (the built-ins) work
    in that buffer; others go through ``quantize``/``dequantize``.
    """
    scheme = scheme or resolve_scheme(spec.scheme)
    observer = observer or resolve_observer(spec.observer)
    w = weight.detach().to(compute_dtype)
    shape = tuple(w.shape)
    sizes = spec.block_sizes(shape, channel_axis, input_axis, layer)
    groups = to_groups(w, sizes)
    lo, hi = observer.observe(groups, spec, scheme)
    # minmax ranges carry any NaN/inf; other observers (percentile) may hide them.
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())) or type(observer).__name__ != "MinMaxObserver":
        check_finite(w, layer)
    scale, zero_point = scheme.qparams(lo, hi, spec.dtype)
    scale2 = scale[:, None]
    zp2 = None if zero_point is None else zero_point[:, None]
    storage = spec.dtype.torch_storage
    if callable(getattr(scheme, "quantize_into", None)) and callable(getattr(scheme, "dequantize_", None)):
        values = torch.empty(groups.shape, dtype=groups.dtype, device=groups.device)
        scheme.quantize_into(groups, scale2, zp2, spec.dtype, values)
        codes = values.to(storage)
        scheme.dequantize_(values, scale2, zp2)
    else:
        q = scheme.quantize(groups, scale2, zp2, spec.dtype)
        codes = q.to(storage)
        values = scheme.dequantize(q, scale2, zp2)
        del q
    sq_err, ref_sq = _squared_error(values, groups)
    qshape = scale_shape(shape, sizes)
    record = QuantizedWeight(
        codes=from_groups(codes, shape, sizes),
        scale=scale.reshape(qshape).to(torch.float32),
        zero_point=None if zero_point is None else zero_point.reshape(qshape).to(storage),
        spec=spec,
        block_sizes=tuple(sizes),
        channel_axis=channel_axis,
        input_axis=input_axis,
    )
    return record, from_groups(values, shape, sizes), (sq_err, ref_sq)


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(Σ (a − b)², Σ b²)`` in float32 chunks (float64 totals), each chunk read while in cache,
    without a temporary of the tensors' size."""
    a, b = a.reshape(-1), b.reshape(-1)
    err = ref = 0.0
    for i in range(0, a.numel(), _ERROR_CHUNK):
        bi = b[i:i + _ERROR_CHUNK].float()
        err += float(torch.nn.functional.mse_loss(a[i:i + _ERROR_CHUNK].float(), bi, reduction="sum"))
        ref += float(torch.dot(bi, bi))
    return err, ref
