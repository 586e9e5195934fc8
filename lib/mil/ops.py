"""numpy implementations of Core ML MIL ops, used by :mod:`quanta.mil.runner`.

Each implementation takes the op (for its declared output shapes and name) and ``a``, a
dict of its evaluated inputs (``None`` for an omitted optional input), and returns one
array, or a tuple of arrays for a multi-output op. fp16 inputs arrive already widened to
fp32; the runner rounds every result to the output's declared dtype, so the functions
here compute in fp32 (or fp64 where that is cheaper to write) and never round themselves.

Semantics follow ``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``. Convolution and
pooling live in :mod:`quanta.mil.ops_conv`, registered into ``OPS`` when this
module is imported.
"""

from __future__ import annotations

import math

import numpy as np

from quanta.mil import ops_conv  # noqa: F401  (registers convolution and pooling)
from quanta.mil import ops_index  # noqa: F401  (registers gather, gather_nd, band_part, cumsum, fill_like)
from quanta.mil.optable import OPS, UnsupportedOpError, axis_shape as _axis_shape, op as _op, supported_ops, unsupported as _unsupported

__all__ = ["UnsupportedOpError", "OPS", "supported_ops"]


# ---------------------------------------------------------------- constants, weights


@_op("const")
def _const(op, a):
    return np.asarray(op.outputs[0].val)


@_op("constexpr_affine_dequantize")
def _affine_dequantize(op, a):
    # output = scale * (quantized_data - zero_point), scale/zero_point per axis or scalar.
    q = a["quantized_data"]
    axis = int(a["axis"])
    zp = _axis_shape(a["zero_point"], q.ndim, axis).astype(np.float32)
    scale = _axis_shape(a["scale"], q.ndim, axis)
    return (q.astype(np.float32) - zp) * scale


def _repeat_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat each entry of a per-block ``param`` so it has ``shape`` (block = shape / param.shape)."""
    for axis, (n, m) in enumerate(zip(shape, param.shape)):
        if n != m:
            param = np.repeat(param, n // m, axis=axis)
    return param


@_op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(op, a):
    # output[i..] = scale[i/block..] * (data[i..] - offset[i/block..])
    data = a["data"].astype(np.float32)
    if a.get("offset") is not None:
        data = data - _repeat_blocks(a["offset"].astype(np.float32), data.shape)
    return data * _repeat_blocks(a["scale"], data.shape)


@_op("constexpr_cast")
def _constexpr_cast(op, a):
    return a["source_val"]


# ---------------------------------------------------------------- quantization (iOS17)


@_op("quantize")
def _quantize(op, a):
    x = a["input"]
    axis = None if a.get("axis") is None else int(a["axis"])
    q = np.round(x / _axis_shape(a["scale"], x.ndim, axis))  # round half to even, as coremltools
    if a.get("zero_point") is not None:
        q = q + _axis_shape(a["zero_point"], x.ndim, axis).astype(np.float32)
    info = np.iinfo(np.dtype(str(a["output_dtype"])))
    return np.clip(q, info.min, info.max)


@_op("dequantize")
def _dequantize(op, a):
    x = a["input"].astype(np.float32)
    axis = None if a.get("axis") is None else int(a["axis"])
    if a.get("zero_point") is not None:
        x = x - _axis_shape(a["zero_point"], x.ndim, axis).astype(np.float32)
    return x * _axis_shape(a["scale"], x.ndim, axis)


@_op("cast", "identity")
def _cast(op, a):
    return a["x"]  # the runner's rounding to the declared dtype is the cast


# ---------------------------------------------------------------- elementwise

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "maximum": np.maximum, "minimum": np.minimum, "pow": np.power,
    "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _erf(x):
    # Vectorised erf from the Chebyshev fit of erfc in Numerical Recipes (|rel err| < 1.2e-7,
    # below fp32 resolution); math.erf would need a Python loop over elements.
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    coeffs = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
              0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)
    poly = np.zeros_like(t)
    for c in reversed(coeffs[1:]):
        poly = (poly + c) * t
    erfc = t * np.exp(-z * z + coeffs[0] + poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def _eps(a):
    return a.get("epsilon") or 0.0


# Unary ops as f(x, inputs). np.round rounds half to even, as coremltools' own `round`.
_UNARY = {
    "abs": lambda x, a: np.abs(x), "ceil": lambda x, a: np.ceil(x),
    "floor": lambda x, a: np.floor(x), "round": lambda x, a: np.round(x),
    "sign": lambda x, a: np.sign(x), "exp": lambda x, a: np.exp(x),
    "exp2": lambda x, a: np.exp2(x), "sqrt": lambda x, a: np.sqrt(x),
    "square": lambda x, a: np.square(x), "sin": lambda x, a: np.sin(x),
    "cos": lambda x, a: np.cos(x), "tan": lambda x, a: np.tan(x),
    "tanh": lambda x, a: np.tanh(x), "erf": lambda x, a: _erf(x),
    "logical_not": lambda x, a: np.logical_not(x),
    "rsqrt": lambda x, a: 1.0 / np.sqrt(x + _eps(a)),
    "inverse": lambda x, a: 1.0 / (x + _eps(a)),
    "log": lambda x, a: np.log(x + _eps(a)),
    "relu": lambda x, a: np.maximum(x, 0),
    "relu6": lambda x, a: np.clip(x, 0, 6),
    "leaky_relu": lambda x, a: np.where(x >= 0, x, x * a["alpha"]),
    "clip": lambda x, a: np.minimum(np.maximum(x, a["alpha"]), a["beta"]),
    "sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "silu": lambda x, a: x / (1.0 + np.exp(-x)),
    "softplus": lambda x, a: np.logaddexp(0, x),
}


def _binary(fn):
    return lambda op, a: fn(a["x"], a["y"])


def _unary(fn):
    return lambda op, a: fn(a["x"], a)


OPS.update({name: _binary(fn) for name, fn in _BINARY.items()})
OPS.update({name: _unary(fn) for name, fn in _UNARY.items()})


@_op("gelu")
def _gelu(op, a):
    x, mode = a["x"].astype(np.float64), str(a.get("mode") or "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise _unsupported(op, f"gelu mode {mode!r}")


@_op("select")
def _select(op, a):
    return np.where(a["cond"].astype(bool), a["a"], a["b"])


# ---------------------------------------------------------------- reductions, softmax


def _softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


@_op("softmax")
def _softmax_op(op, a):
    return _softmax(a["x"], int(a.get("axis", -1)))


_REDUCE = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
    "reduce_min": np.min, "reduce_prod": np.prod,
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
}


def _reduce(fn):
    def run(op, a):
        axes = a.get("axes")
        axes = None if axes is None else tuple(int(i) for i in np.atleast_1d(axes))
        return fn(a["x"], axis=axes, keepdims=bool(a.get("keep_dims", False)))

    return run


OPS.update({name: _reduce(fn) for name, fn in _REDUCE.items()})


@_op("reduce_argmax", "reduce_argmin")
def _reduce_arg(op, a):
    fn = np.argmax if op.op_type == "reduce_argmax" else np.argmin
    axis = int(a.get("axis", -1))
    out = fn(a["x"], axis=axis)
    return np.expand_dims(out, axis) if a.get("keep_dims") else out


# ---------------------------------------------------------------- normalization


def _normalize(x, axes, a, param_shape):
    """(x - mean) / sqrt(var + epsilon) over ``axes``, then ``gamma``/``beta`` if given."""
    mean = x.mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + float(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        y = y * a["gamma"].reshape(param_shape)
    return y if a.get("beta") is None else y + a["beta"].reshape(param_shape)


@_op("batch_norm")
def _batch_norm(op, a):
    x = a["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - a["mean"].reshape(shape)) / np.sqrt(a["variance"].reshape(shape) + float(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        y = y * a["gamma"].reshape(shape)
    return y if a.get("beta") is None else y + a["beta"].reshape(shape)


@_op("layer_norm")
def _layer_norm(op, a):
    x, axes = a["x"], a.get("axes")
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(i) % x.ndim for i in np.atleast_1d(axes))
    return _normalize(x, axes, a, [x.shape[i] if i in axes else 1 for i in range(x.ndim)])


@_op("instance_norm")
def _instance_norm(op, a):
    x = a["x"]
    return _normalize(x, tuple(range(2, x.ndim)), a, (1, -1) + (1,) * (x.ndim - 2))


# ---------------------------------------------------------------- linear algebra


def _product(x, y):
    """``np.matmul(x, y)``; float32 operands through torch's matmul, which on CPU took a sixth of
    numpy's time (a [56, 384] x [384, 1536] product: 2.5 ms against 16 ms with numpy's OpenBLAS,
    one thread): the linears were most of an fp16 overflow check of a transformer. Summation order
    differs from numpy's by float32 rounding only; other dtypes stay with numpy."""
    if x.dtype != np.float32 or y.dtype != np.float32 or min(x.strides + y.strides, default=0) < 0:
        return np.matmul(x, y)  # (torch takes no negative strides)
    import warnings

    import torch

    with warnings.catch_warnings():  # read-only constants: torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        return torch.matmul(torch.from_numpy(x), torch.from_numpy(y)).numpy()


@_op("linear")
def _linear(op, a):
    x = a["x"]
    # One 2-D product (a BLAS gemm) rather than a loop over the leading dimensions: ~4x faster.
    y = _product(x.reshape(-1, x.shape[-1]), a["weight"].T).reshape(*x.shape[:-1], -1) if x.ndim > 2 \
        else _product(x, a["weight"].T)
    return y if a.get("bias") is None else y + a["bias"]


@_op("matmul")
def _matmul(op, a):
    x, y = a["x"], a["y"]
    if a.get("transpose_x") and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y") and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return _product(x, y)


@_op("scaled_dot_product_attention")
def _sdpa(op, a):
    q, k, v = a["query"], a["key"], a["value"]
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    mask = a.get("attn_mask")
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    return np.matmul(_softmax(scores, -1), v)


# ---------------------------------------------------------------- shapes and indexing


def _ints(v):
    return [int(i) for i in np.atleast_1d(v)]


_SIMPLE = {
    "transpose": lambda a: np.transpose(a["x"], _ints(a["perm"])),
    "stack": lambda a: np.stack(a["values"], axis=int(a["axis"])),
    "tile": lambda a: np.tile(a["x"], _ints(a["reps"])),
    "fill": lambda a: np.full(_ints(a["shape"]), a.get("value", 0.0)),
    "shape": lambda a: np.array(a["x"].shape, dtype=np.int32),
    "range_1d": lambda a: np.arange(a["start"], a["end"], a["step"]),
}
OPS.update({name: (lambda f: lambda op, a: f(a))(fn) for name, fn in _SIMPLE.items()})


@_op("reshape")
def _reshape(op, a):
    shape = _ints(a["shape"])
    if 0 in shape:
        # A 0 copies an input dim, matched by position (iOS15) or from the right (iOS17);
        # the program's declared output shape already resolves it.
        declared = tuple(op.outputs[0].shape)
        if not all(isinstance(d, (int, np.integer)) for d in declared):
            raise _unsupported(op, "reshape with 0 in shape and a symbolic output shape")
        shape = list(declared)
    return np.reshape(a["x"], shape)


@_op("expand_dims")
def _expand_dims(op, a):
    x = a["x"]
    rank = x.ndim + len(a["axes"])
    return np.expand_dims(x, tuple(int(i) % rank for i in a["axes"]))


@_op("squeeze")
def _squeeze(op, a):
    axes = a.get("axes")
    return np.squeeze(a["x"], None if axes is None else tuple(int(i) for i in np.atleast_1d(axes)))


@_op("concat")
def _concat(op, a):
    values, axis = a["values"], int(a["axis"])
    if a.get("interleave"):
        raise _unsupported(op, "concat with interleave=True")
    # scalars (shape arithmetic on a flexible program) concatenate as length-1 vectors, as in MIL
    return np.concatenate([np.atleast_1d(v) for v in values], axis=axis)


@_op("split")
def _split(op, a):
    x, axis = a["x"], int(a["axis"])
    sizes = a.get("split_sizes")
    if sizes is None:
        sizes = [x.shape[axis] // int(a["num_splits"])] * int(a["num_splits"])
    return tuple(np.split(x, np.cumsum([int(s) for s in sizes])[:-1], axis=axis))


@_op("slice_by_index")
def _slice_by_index(op, a):
    x = a["x"]
    rank = x.ndim

    def flags(key):
        v = a.get(key)
        return [False] * rank if v is None else [bool(f) for f in v]

    begin, end = [int(i) for i in a["begin"]], [int(i) for i in a["end"]]
    stride = [1] * rank if a.get("stride") is None else [int(i) for i in a["stride"]]
    begin_mask, end_mask, squeeze_mask = flags("begin_mask"), flags("end_mask"), flags("squeeze_mask")
    index = []
    for d in range(rank):
        if squeeze_mask[d]:
            index.append(0 if begin_mask[d] else begin[d])  # an integer index drops the axis
            continue
        index.append(slice(None if begin_mask[d] else begin[d], None if end_mask[d] else end[d], stride[d]))
    return x[tuple(index)]


@_op("slice_by_size")
def _slice_by_size(op, a):
    x = a["x"]
    index = tuple(
        slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(a["begin"], a["size"])
    )
    return x[index]


@_op("gather_along_axis")
def _gather_along_axis(op, a):
    x, indices, axis = a["x"], a["indices"].astype(np.int64), int(a.get("axis", 0))
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take_along_axis(x, indices, axis=axis)

