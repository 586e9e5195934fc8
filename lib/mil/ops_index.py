"""numpy implementations of the MIL indexing and sequence ops transformers programs use:
``gather`` / ``gather_nd`` with ``batch_dims``, ``band_part``, ``cumsum``, ``fill_like``
(``range_1d``, ``tile``, ``select``, ``sin``/``cos``, ``rsqrt``, ``silu`` live in :mod:`quanta.mil.ops`).

Registered into :data:`quanta.mil.optable.OPS` (calling convention ``fn(op, a)``, fp16 inputs
widened to fp32, results rounded by the runner). Semantics follow
``coremltools/converters/mil/mil/ops/defs/iOS15/scatter_gather.py``, ``tensor_operation.py``
and their iOS16/iOS17 revisions (``batch_dims``, negative indices allowed).
"""

from __future__ import annotations

import numpy as np

from quanta.mil.optable import op as _op

__all__: list[str] = []  # nothing public: the ops are reached through quanta.mil.optable.OPS


def _wrap(indices: np.ndarray, size) -> np.ndarray:
    indices = indices.astype(np.int64)
    return np.where(indices < 0, indices + np.asarray(size, dtype=np.int64), indices)


def _batched(fn, x, indices, batch_dims):
    """Apply ``fn(x_b, indices_b)`` for every index of the leading ``batch_dims`` axes."""
    if batch_dims == 0:
        return fn(x, indices)
    lead = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    ids = indices.reshape((-1,) + indices.shape[batch_dims:])
    out = np.stack([fn(xb, ib) for xb, ib in zip(xs, ids)])
    return out.reshape(lead + out.shape[1:])


@_op("gather")
def _gather(op, a):
    x, axis = a["x"], int(a.get("axis", 0))
    batch_dims = int(a.get("batch_dims") or 0)
    axis = axis % x.ndim
    indices = _wrap(a["indices"], x.shape[axis])
    return _batched(lambda xb, ib: np.take(xb, ib, axis=axis - batch_dims), x, indices, batch_dims)


@_op("gather_nd")
def _gather_nd(op, a):
    # output[i..., :] = x[indices[i..., 0], ..., indices[i..., K-1], :] (after batch_dims)
    x, indices = a["x"], a["indices"]
    batch_dims = int(a.get("batch_dims") or 0)
    k = indices.shape[-1]
    indices = _wrap(indices, x.shape[batch_dims:batch_dims + k])
    return _batched(lambda xb, ib: xb[tuple(np.moveaxis(ib, -1, 0))], x, indices, batch_dims)


@_op("band_part")
def _band_part(op, a):
    # keep x[..., m, n] where (lower < 0 or m - n <= lower) and (upper < 0 or n - m <= upper)
    x = a["x"]
    lower, upper = int(a.get("lower", -1)), int(a.get("upper", -1))
    m = np.arange(x.shape[-2])[:, None]
    n = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@_op("cumsum")
def _cumsum(op, a):
    x, axis = a["x"], int(a.get("axis", 0))
    exclusive, reverse = bool(a.get("exclusive", False)), bool(a.get("reverse", False))
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if exclusive:
        out = out - x
    return np.flip(out, axis) if reverse else out


@_op("fill_like")
def _fill_like(op, a):
    return np.full(a["ref_tensor"].shape, a.get("value", 0.0))
