"""Quantizing one weight tensor with a spec, through the scheme and observer plugins."""

from __future__ import annotations

import math

import torch

from quanta.errors import QuantizationError
from quanta.registry.guard import plugin_code, plugin_distribution
from quanta.registry.lookup import observer_for, resolve_observer, resolve_scheme, scheme_for
from quanta._records.qmath import empty, from_groups, scale_shape, to_groups
from quanta.record import QuantizedWeight
from quanta._records.spec import QuantSpec

__all__ = ["quantize_weight", "quantize_weight_with_values", "write_values", "check_finite", "resolve_scheme", "resolve_observer",
           "scheme_for", "observer_for", "check_observed_range"]


def check_observed_range(observer, lo, hi, n_groups: int, layer: str | None = None) -> None:
    """Check an observer's result: ``[G]`` tensors with ``min <= max`` where finite. Raises
    PluginError naming the observer (and ``layer``) otherwise; non-finite ranges are left to the
    NaN/inf check, which names the weight's bad values."""
    from quanta.errors import PluginError

    problem = None
    if not (isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor)):
        problem = f"observe() must return two tensors, got {type(lo).__name__} and {type(hi).__name__}"
    elif tuple(lo.shape) != (n_groups,) or tuple(hi.shape) != (n_groups,):
        problem = f"observe() returned shapes {tuple(lo.shape)} and {tuple(hi.shape)}; expected ({n_groups},) each"
    elif bool((lo > hi).any()):
        problem = f"observe() returned min > max for {int((lo > hi).sum())} of {n_groups} groups"
    if problem:
        raise PluginError("observer", observer.name, plugin_distribution("observer", observer.name), ValueError(problem), layer)


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


def quantize_weight_with_values(weight, spec, *, channel_axis=0, input_axis=1, layer=None, scheme=None,
                                observer=None, compute_dtype=torch.float32, keep_values=True):
    """Like :func:`quantize_weight`, also returning the dequantized weight and the squared norms.

    Returns ``(record, dequantized [weight's shape, compute dtype], (‖W − Ŵ‖², ‖W‖²))``. With
    ``keep_values=False`` (affine grids) the dequantized weight is not kept (None in its place):
    each chunk's values live in a small scratch buffer for the error only, so the codes are the
    one large allocation; :func:`write_values` writes the same values later.
    Every step is a whole-tensor torch op on the grouped ``[G, K]`` view (no copy for Linear
    weights). Fresh memory is the expensive part on CPU (page faults), so only what is kept
    is allocated: one float buffer that becomes the dequantized weight, and the codes. Schemes
    work in that buffer through ``quantize_into``/``dequantize_`` (in place for the built-ins;
    the contract's defaults copy ``quantize``/``dequantize`` results into it).
    """
    scheme = scheme or scheme_for(spec)
    observer = observer or observer_for(spec)
    w = weight.detach().to(compute_dtype)
    shape = tuple(w.shape)
    sizes = spec.block_sizes(shape, channel_axis, input_axis, layer)
    groups = to_groups(w, sizes)
    if not observer.ranges_carry_non_finite:
        check_finite(w, layer)  # this observer's ranges may hide NaN/inf (e.g. percentile)
    storage = spec.dtype.torch_storage
    table = None
    if scheme.grid == "lut":
        if observer.ranges_carry_non_finite:
            check_finite(w, layer)  # a table is computed from the values themselves
        table = _quantize_with_table(groups, spec, scheme, storage, layer)
    if table is not None:
        values, codes, scale, zero_point, lut, (sq_err, ref_sq) = table
    else:
        lut = None
        values, codes, scale, zero_point, (sq_err, ref_sq) = _quantize_in_chunks(
            groups, spec, scheme, observer, storage, w, layer, keep_values)
    qshape = scale_shape(shape, sizes)
    record = QuantizedWeight(
        codes=from_groups(codes, shape, sizes),
        scale=scale.reshape(qshape).to(torch.float32),
        zero_point=None if zero_point is None else zero_point.reshape(qshape).to(storage),
        spec=spec,
        grid=scheme.grid,
        block_sizes=tuple(sizes),
        channel_axis=channel_axis,
        input_axis=input_axis,
        lut=lut,
    )
    return record, None if values is None else from_groups(values, shape, sizes), (sq_err, ref_sq)


def write_values(record: QuantizedWeight, out: torch.Tensor) -> None:
    """Write ``record``'s dequantized values into ``out`` (float32, the weight's shape, contiguous:
    the float weight's own storage in an in-place run), chunk by chunk, with no large allocation.

    For affine grids: ``(codes - zero_point) * scale`` with the built-in schemes' in-place
    operations, so the values equal, bit for bit, the ones :func:`quantize_weight_with_values`
    computed (its float codes are integers, and ``codes - zero_point`` of two zeros is +0.0 either
    way) and ``record.dequantize()``."""
    sizes = list(record.block_sizes)
    grouped = to_groups(out, sizes)
    if record.grid != "affine" or record.lut is not None or out.dtype != torch.float32 \
            or grouped.data_ptr() != out.data_ptr() or not grouped.is_contiguous():
        raise ValueError("write_values needs an affine record and a contiguous float32 tensor grouped without a copy")
    codes = to_groups(record.codes, sizes)
    scale = record.scale.reshape(-1, 1)
    zero_point = None if record.zero_point is None else record.zero_point.reshape(-1, 1).to(torch.float32)
    rows = max(1, _FUSED_CHUNK // max(grouped.shape[1], 1))
    for r0 in range(0, grouped.shape[0], rows):
        v = grouped[r0:r0 + rows]
        v.copy_(codes[r0:r0 + rows])
        if zero_point is not None:
            v.sub_(zero_point[r0:r0 + rows])
        v.mul_(scale[r0:r0 + rows])


def writes_in_place(weight: torch.Tensor, block_sizes: list[int]) -> bool:
    """Whether :func:`write_values` can write into ``weight`` itself: float32, contiguous, and its
    ``[G, K]`` grouping a view (no permute: Linear, Conv, per-channel or blocks along the input)."""
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        return False
    grouped = to_groups(weight, block_sizes)
    return grouped.data_ptr() == weight.data_ptr() and grouped.is_contiguous()


def _quantize_with_table(groups, spec, scheme, storage, layer):
    """The lookup-table path of a ``grid = "lut"`` scheme whose ``lut()`` gives a per-group table:
    ``(values, codes, scale [G] (ones), None, lut [G, L] float32, (‖W − Ŵ‖², ‖W‖²))``, or None
    when the scheme computes no table (its ``dequantize`` maps codes itself)."""
    from quanta.errors import PluginError
    from quanta._run.guard import plugin_distribution

    def broken(problem):
        return PluginError("scheme", scheme.name, plugin_distribution("scheme", scheme.name), ValueError(problem),
                           layer)

    n_groups, k = groups.shape
    rows = max(1, _FUSED_CHUNK // max(k, 1))
    # Codes are table indices 0..L-1: a signed dtype stores half as many non-negative codes.
    levels = 1 << (spec.dtype.bits - (1 if spec.dtype.signed else 0))
    tables, codes, values = [], [], []
    for r0 in range(0, n_groups, rows):  # rows are independent: chunks bound the [G, K, L] distances
        g = groups[r0:r0 + rows]
        with plugin_code(scheme, layer):
            table = scheme.lut(g, spec)
        if table is None:
            if r0 == 0:
                return None
            raise broken("lut() returned a table for the first rows and None for later ones")
        if (not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != g.shape[0]
                or not 1 <= table.shape[1] <= levels):
            raise broken(f"lut() returned {tuple(getattr(table, 'shape', ()))}; expected ({g.shape[0]}, L) with "
                         f"1 <= L <= {levels} (the non-negative codes of {spec.dtype})")
        if not bool(torch.isfinite(table).all()):
            raise broken("lut() returned a table holding NaN or inf")
        table = table.to(groups.dtype)
        with plugin_code(scheme, layer):
            c = scheme.quantize_lut(g, table)
        if (not isinstance(c, torch.Tensor) or c.shape != g.shape or not bool(torch.equal(c, c.round()))
                or bool((c < 0).any()) or bool((c >= table.shape[1]).any())):
            raise broken(f"quantize_lut() must return integer codes 0..{table.shape[1] - 1} of shape {tuple(g.shape)}")
        with plugin_code(scheme, layer):
            v = scheme.dequantize_lut(c, table, torch.ones((g.shape[0], 1), dtype=groups.dtype, device=groups.device))
        tables.append(table)
        codes.append(c)
        values.append(v.to(groups.dtype))
    width = max(t.shape[1] for t in tables)  # one width for the record: pad short tables with their last level
    lut = torch.cat([torch.cat([t, t[:, -1:].expand(-1, width - t.shape[1])], dim=1) for t in tables])
    values_ = torch.cat(values)
    diff = (values_ - groups).double()
    errors = (float((diff * diff).sum()), float((groups.double() ** 2).sum()))
    scale = torch.ones(n_groups, dtype=groups.dtype, device=groups.device)
    return values_, torch.cat(codes).to(storage), scale, None, lut.to(torch.float32), errors


#: Elements per chunk of the fused quantize -> codes -> dequantize -> error pass (about 4 MiB of
#: float32: every step of a chunk finds its data in cache).
_FUSED_CHUNK = 1 << 20


def _check_range(lo, hi, w, layer) -> None:
    # minmax ranges carry any NaN/inf of their groups: the full check runs only on failure.
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        check_finite(w, layer)


def _quantize_in_chunks(groups, spec, scheme, observer, storage, w, layer, keep_values=True):
    """The in-place fast path over row chunks of the ``[G, K]`` view: observe, qparams,
    quantize, codes, dequantize and error for one chunk while it is in cache.

    Observers and schemes are per-group, so chunking by whole groups changes no result.
    Returns ``(values, codes, scale [G], zero_point [G] or None, (Σ(values − groups)², Σ groups²))``;
    ``values`` and ``codes`` are the only large allocations (``keep_values=False``: ``values`` is
    None and each chunk's values are computed in a scratch buffer, for the error only).
    """
    n_groups, k = groups.shape
    device = groups.device
    rows = max(1, _FUSED_CHUNK // max(k, 1))
    values = empty(groups.shape, groups.dtype, device) if keep_values else None
    chunk_values = None if keep_values else torch.empty((min(rows, n_groups), k), dtype=groups.dtype, device=device)
    codes = empty(groups.shape, storage, device)
    scale = torch.empty(n_groups, dtype=groups.dtype, device=device)
    zero_point = None
    scratch = torch.empty((min(rows, n_groups), k), dtype=torch.float32, device=device)
    err = torch.zeros((), dtype=torch.float64, device=device)
    ref = torch.zeros((), dtype=torch.float64, device=device)
    for r0 in range(0, n_groups, rows):  # a loop over chunks, each step vectorised
        g = groups[r0:r0 + rows]
        v = values[r0:r0 + rows] if values is not None else chunk_values[: g.shape[0]]
        with plugin_code(observer, layer):
            lo, hi = observer.observe(g, spec, scheme)
        if not _range_fine(lo, hi, g.shape[0]):  # one reduction when it is; the full checks name the problem
            check_observed_range(observer, lo, hi, g.shape[0], layer)
            _check_range(lo, hi, w, layer)
        with plugin_code(scheme, layer):
            s, z = scheme.qparams(lo, hi, spec.dtype)
        if not _qparams_fine(s, z, g.shape[0]):
            _check_qparams(scheme, s, z, g.shape[0], layer)
        scale[r0:r0 + rows] = s
        if z is not None:
            if zero_point is None:
                zero_point = torch.empty(n_groups, dtype=groups.dtype, device=device)
            zero_point[r0:r0 + rows] = z
            z = z[:, None]
        s = s[:, None]
        with plugin_code(scheme, layer):
            scheme.quantize_into(g, s, z, spec.dtype, v)
            codes[r0:r0 + rows].copy_(v)
            scheme.dequantize_(v, s, z)
        diff = scratch[: g.shape[0]]
        torch.sub(v, g, out=diff)
        flat, gf = diff.reshape(-1), g.reshape(-1).float()
        err += torch.dot(flat, flat)
        ref += torch.dot(gf, gf)
    return values, codes, scale, zero_point, (float(err), float(ref))


def _range_fine(lo, hi, n_groups: int) -> bool:
    """The fast path of :func:`check_observed_range` and the NaN/inf check: ``[G]`` tensors with
    ``min <= max``, all finite, in one reduction of ``lo - hi`` (NaN and inf carry into it; an
    overflow only sends the call to the full checks, which then pass)."""
    if not (isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor)) or tuple(lo.shape) != (n_groups,) \
            or tuple(hi.shape) != (n_groups,):
        return False
    low, high = torch.aminmax(lo - hi)
    return math.isfinite(low) and math.isfinite(high) and float(high) <= 0


def _qparams_fine(scale, zero_point, n_groups: int) -> bool:
    """The fast path of :func:`_check_qparams`: shapes, and every scale finite and positive in one reduction."""
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (n_groups,) or (
            zero_point is not None and (not isinstance(zero_point, torch.Tensor) or tuple(zero_point.shape) != (n_groups,))):
        return False
    low, high = torch.aminmax(scale)
    return float(low) > 0 and math.isfinite(high)


def _check_qparams(scheme, scale, zero_point, n_groups: int, layer) -> None:
    # The contract: a finite, positive scale for every group (all-zero groups included).
    from quanta.errors import PluginError

    problem = None
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (n_groups,):
        problem = f"qparams() returned a scale of shape {tuple(getattr(scale, 'shape', ()))}; expected ({n_groups},)"
    elif not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        problem = "qparams() returned a zero, negative, NaN or inf scale"
    elif zero_point is not None and (not isinstance(zero_point, torch.Tensor) or tuple(zero_point.shape) != (n_groups,)):
        problem = f"qparams() returned a zero point of shape {tuple(getattr(zero_point, 'shape', ()))}; expected ({n_groups},)"
    if problem:
        raise PluginError("scheme", scheme.name, plugin_distribution("scheme", scheme.name), ValueError(problem), layer)
