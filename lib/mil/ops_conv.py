"""numpy implementations of the MIL convolution and pooling ops: ``conv``, ``conv_transpose``,
``max_pool``, ``avg_pool``.

Registered into :data:`quanta.mil.ops.OPS` (same calling convention: ``fn(op, a)``
with fp16 inputs widened to fp32; the runner rounds results). x is ``(N, C, *spatial)`` with
1 to 3 spatial dims; conv weights are ``(C_out, C_in/groups, *K)``, conv_transpose weights
``(C_in, C_out/groups, *K)``. Semantics follow ``coremltools/converters/mil/mil/ops/defs/iOS15/conv.py``
and ``pool.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from quanta.mil.optable import op as _op, unsupported as _unsupported

__all__: list[str] = []  # nothing public: the ops are reached through quanta.mil.optable.OPS


def _spatial_pads(op, a, kernel, strides, dilations, in_shape):
    """(before, after) per spatial dim for pad_type valid/custom/same/same_lower."""
    pad_type = str(a.get("pad_type") or "valid")
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = [0] * 2 * n if a.get("pad") is None else [int(p) for p in a["pad"]]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_shape, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise _unsupported(op, f"pad_type {pad_type!r}")


def _windows(x, kernel, strides, dilations):
    """Windows of x (N, C, *S) as (N, C, *O, *K) for the given strides and dilations."""
    n = len(kernel)
    spatial = tuple(range(2, 2 + n))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    w = sliding_window_view(x, span, axis=spatial)
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    return w[index]


def _conv_nd(x, weight, bias, strides, dilations, pads, groups):
    """Cross-correlation: x (N, C_in, *S), weight (C_out, C_in/groups, *K) -> (N, C_out, *O)."""
    n = weight.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + list(pads))
    win = _windows(x, weight.shape[2:], strides, dilations)  # (N, C_in, *O, *K)
    batch, c_in = win.shape[:2]
    out_sp = win.shape[2 : 2 + n]
    c_out, c_g = weight.shape[0], c_in // groups
    win = win.reshape((batch, groups, c_g) + win.shape[2:])
    # (N, G, *O, C_g, *K) -> (N, G, P, C_g*K)
    order = (0, 1) + tuple(range(3, 3 + n)) + (2,) + tuple(range(3 + n, 3 + 2 * n))
    win = win.transpose(order).reshape(batch, groups, int(np.prod(out_sp)), -1)
    w = weight.reshape(groups, c_out // groups, -1).transpose(0, 2, 1)  # (G, C_g*K, O_g)
    y = np.matmul(win, w)  # (N, G, P, O_g)
    y = y.transpose(0, 1, 3, 2).reshape((batch, c_out) + tuple(out_sp))
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * n)
    return y


def _conv_params(a, n):
    strides = [1] * n if a.get("strides") is None else [int(s) for s in a["strides"]]
    dilations = [1] * n if a.get("dilations") is None else [int(d) for d in a["dilations"]]
    return strides, dilations, int(a.get("groups") or 1)


@_op("conv")
def _conv(op, a):
    x, weight = a["x"], a["weight"]
    n = x.ndim - 2
    strides, dilations, groups = _conv_params(a, n)
    pads = _spatial_pads(op, a, weight.shape[2:], strides, dilations, x.shape[2:])
    return _conv_nd(x, weight, a.get("bias"), strides, dilations, pads, groups)


@_op("conv_transpose")
def _conv_transpose(op, a):
    # Scatter form rewritten as a stride-1 correlation: insert (stride-1) zeros between
    # inputs, pad by the dilated kernel span - 1, correlate with the flipped kernel, then
    # crop `pad` (or the same-padding amount) and fit the declared output shape.
    x, weight = a["x"], a["weight"]  # weight (C_in, C_out/groups, *K)
    n = x.ndim - 2
    strides, dilations, groups = _conv_params(a, n)
    kernel = weight.shape[2:]
    up_shape = x.shape[:2] + tuple((s - 1) * st + 1 for s, st in zip(x.shape[2:], strides))
    up = np.zeros(up_shape, dtype=x.dtype)
    up[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)] = x
    c_in, c_og = weight.shape[:2]
    w = weight.reshape((groups, c_in // groups, c_og) + kernel).swapaxes(1, 2)
    w = w.reshape((groups * c_og, c_in // groups) + kernel)
    w = np.flip(w, axis=tuple(range(2, 2 + n)))
    span = [(k - 1) * d for k, d in zip(kernel, dilations)]
    full = _conv_nd(up, w, None, [1] * n, dilations, [(s, s) for s in span], groups)
    out_shape = tuple(op.outputs[0].shape)
    pad_type = str(a.get("pad_type") or "valid")
    if pad_type == "custom":
        before = [int(p) for p in a["pad"][::2]]
    elif pad_type in ("same", "same_lower"):
        totals = [max(f - o, 0) for f, o in zip(full.shape[2:], out_shape[2:])]
        before = [t // 2 if pad_type == "same" else t - t // 2 for t in totals]
    else:
        before = [0] * n
    extra = [max(0, b + o - f) for b, o, f in zip(before, out_shape[2:], full.shape[2:])]
    full = np.pad(full, [(0, 0), (0, 0)] + [(0, e) for e in extra])
    y = full[(slice(None), slice(None)) + tuple(slice(b, b + o) for b, o in zip(before, out_shape[2:]))]
    if a.get("bias") is not None:
        y = y + a["bias"].reshape((1, -1) + (1,) * n)
    return y


def _pool(op, a, reduce):
    x = a["x"]
    n = x.ndim - 2
    kernel = [int(k) for k in a["kernel_sizes"]]
    strides = [1] * n if a.get("strides") is None else [int(s) for s in a["strides"]]
    ones = [1] * n
    pads = _spatial_pads(op, a, kernel, strides, ones, x.shape[2:])
    # ceil_mode: windows may run past the padded input; that overhang is absent (neither in
    # the max nor in the average's divisor), as in PyTorch. Its size comes from the
    # declared output shape.
    out_sp = tuple(op.outputs[0].shape[2:])
    over = [
        max(0, (o - 1) * s + k - (size + b + e))
        for o, s, k, size, (b, e) in zip(out_sp, strides, kernel, x.shape[2:], pads)
    ]
    full_pads = [(b, e + v) for (b, e), v in zip(pads, over)]
    fill = -np.inf if reduce == "max" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0)] + full_pads, constant_values=fill)
    win = _windows(xp, kernel, strides, ones)
    k_axes = tuple(range(-n, 0))
    if reduce == "max":
        return win.max(axis=k_axes)
    if a.get("exclude_padding_from_average"):
        mask = np.pad(np.ones(x.shape[2:]), full_pads)
    else:
        mask = np.pad(np.pad(np.ones(x.shape[2:]), pads, constant_values=1.0), [(0, v) for v in over])
    count = _windows(mask[None, None], kernel, strides, ones)[0, 0].sum(axis=k_axes)
    return win.sum(axis=k_axes) / count


@_op("max_pool")
def _max_pool(op, a):
    return _pool(op, a, "max")


@_op("avg_pool")
def _avg_pool(op, a):
    return _pool(op, a, "avg")
