"""Quantizing one weight tensor with a spec, through the scheme and observer plugins."""

from __future__ import annotations

import torch

from .errors import QuantizationError
from .qmath import empty, from_groups, scale_shape, to_groups
from .record import QuantizedWeight
from .spec import QuantSpec

__all__ = ["quantize_weight", "quantize_weight_with_values", "check_finite", "resolve_scheme", "resolve_observer",
           "scheme_for"]


def resolve_scheme(name: str):
    """The scheme implementation registered as ``name``."""
    from quanta import registry

    return registry.get("scheme", name).obj


def scheme_for(spec: QuantSpec):
    """The scheme ``spec`` names, configured with ``spec.scheme_config`` (its defaults when None)."""
    scheme = resolve_scheme(spec.scheme)
    if spec.scheme_config is None:
        return scheme
    return scheme.with_config(spec.scheme_config)


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
    scheme = scheme or scheme_for(spec)
    observer = observer or resolve_observer(spec.observer)
    w = weight.detach().to(compute_dtype)
    shape = tuple(w.shape)
    sizes = spec.block_sizes(shape, channel_axis, input_axis, layer)
    groups = to_groups(w, sizes)
    if not getattr(observer, "ranges_carry_non_finite", False):
        check_finite(w, layer)  # this observer's ranges may hide NaN/inf (e.g. percentile)
    storage = spec.dtype.torch_storage
    if callable(getattr(scheme, "quantize_into", None)) and callable(getattr(scheme, "dequantize_", None)):
        values, codes, scale, zero_point, (sq_err, ref_sq) = _quantize_in_chunks(
            groups, spec, scheme, observer, storage, w, layer)
    else:
        lo, hi = observer.observe(groups, spec, scheme)
        _check_range(lo, hi, w, layer)
        scale, zero_point = scheme.qparams(lo, hi, spec.dtype)
        scale2 = scale[:, None]
        zp2 = None if zero_point is None else zero_point[:, None]
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


#: Elements per chunk of the fused quantize -> codes -> dequantize -> error pass (about 4 MiB of
#: float32: every step of a chunk finds its data in cache).
_FUSED_CHUNK = 1 << 20


def _check_range(lo, hi, w, layer) -> None:
    # minmax ranges carry any NaN/inf of their groups: the full check runs only on failure.
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        check_finite(w, layer)


def _quantize_in_chunks(groups, spec, scheme, observer, storage, w, layer):
    """The in-place fast path over row chunks of the ``[G, K]`` view: observe, qparams,
    quantize, codes, dequantize and error for one chunk while it is in cache.

    Observers and schemes are per-group, so chunking by whole groups changes no result.
    Returns ``(values, codes, scale [G], zero_point [G] or None, (Σ(values − groups)², Σ groups²))``;
    ``values`` and ``codes`` are the only large allocations.
    """
    n_groups, k = groups.shape
    device = groups.device
    values = empty(groups.shape, groups.dtype, device)
    codes = empty(groups.shape, storage, device)
    scale = torch.empty(n_groups, dtype=groups.dtype, device=device)
    zero_point = None
    rows = max(1, _FUSED_CHUNK // max(k, 1))
    scratch = torch.empty((min(rows, n_groups), k), dtype=torch.float32, device=device)
    err = torch.zeros((), dtype=torch.float64, device=device)
    ref = torch.zeros((), dtype=torch.float64, device=device)
    for r0 in range(0, n_groups, rows):  # a loop over chunks, each step vectorised
        g, v = groups[r0:r0 + rows], values[r0:r0 + rows]
        lo, hi = observer.observe(g, spec, scheme)
        _check_range(lo, hi, w, layer)
        s, z = scheme.qparams(lo, hi, spec.dtype)
        scale[r0:r0 + rows] = s
        if z is not None:
            if zero_point is None:
                zero_point = torch.empty(n_groups, dtype=groups.dtype, device=device)
            zero_point[r0:r0 + rows] = z
            z = z[:, None]
        s = s[:, None]
        scheme.quantize_into(g, s, z, spec.dtype, v)
        codes[r0:r0 + rows].copy_(v)
        scheme.dequantize_(v, s, z)
        diff = scratch[: g.shape[0]]
        torch.sub(v, g, out=diff)
        flat, gf = diff.reshape(-1), g.reshape(-1).float()
        err += torch.dot(flat, flat)
        ref += torch.dot(gf, gf)
    return values, codes, scale, zero_point, (float(err), float(ref))


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(Σ (a − b)², Σ b²)``: float32 chunks (float64 totals) through one small scratch buffer,
    each chunk read while in cache, no temporary of the tensors' size."""
    a, b = a.reshape(-1), b.reshape(-1)
    scratch = torch.empty(min(_ERROR_CHUNK, a.numel()), dtype=torch.float32, device=a.device)
    err = ref = 0.0
    for i in range(0, a.numel(), _ERROR_CHUNK):
        bi = b[i:i + _ERROR_CHUNK].float()
        diff = scratch[: bi.numel()]
        torch.sub(a[i:i + _ERROR_CHUNK].float(), bi, out=diff)
        err += float(torch.dot(diff, diff))
        ref += float(torch.dot(bi, bi))
    return err, ref
