"""A numpy reference runner for Core ML ML programs: executes a saved ``.mlpackage`` on Linux.

``coremltools`` runs models only on macOS (``MLModel.predict``). ``run`` walks the MIL
program's ops in order, evaluates each with numpy (:mod:`quanta.mil.ops`)
and rounds every result to the dtype the program declares for it, so an fp16 program is
rounded after every op, as Core ML's fp16 execution is. It is a *reference*: it is meant to
check exported numerics in CI, not to be fast, and it refuses (``UnsupportedOpError``) any
op it does not implement rather than guess.

Example::

    from quanta.mil.runner import run, compare
    out = run("model.mlpackage", {"x": x})          # {"var_57": array(..., float16)}
    compare(out["var_57"], torch_model(x).numpy())  # {"max_abs":..., "max_rel":..., "cosine":...}
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from quanta.errors import QuantaError
from quanta.mil.ops import OPS, UnsupportedOpError, supported_ops
from quanta.mil.program import ModelLike, load_program

__all__ = [
    "UnsupportedOpError",
    "RunnerError",
    "run",
    "run_function",
    "compare",
    "supported_ops",
    "declared_numpy_dtype",
]


class RunnerError(QuantaError, RuntimeError):
    """The runner's result disagrees with the program (shape), or the inputs are wrong."""


def declared_numpy_dtype(var) -> np.dtype | None:
    """The numpy dtype holding values of MIL variable ``var`` (``None`` for strings).

    fp16 → ``float16``, fp32 → ``float32``, int8/int4 → ``int8``, uint8/uint4 → ``uint8``,
    int32 → ``int32``, bool → ``bool``. 4-bit types have no numpy dtype: they are held in
    8-bit arrays.
    """
    from coremltools.converters.mil.mil import types

    dtype = var.dtype
    if dtype is None or types.is_str(dtype):
        return None
    return np.dtype(types.nptype_from_builtin(dtype))


def _is_static(shape) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


def _to_declared(value: Any, var, op) -> Any:
    """Round ``value`` to ``var``'s declared dtype and check its shape against the program."""
    np_dtype = declared_numpy_dtype(var)
    if np_dtype is None:
        return value
    value = np.asarray(value)
    if np.issubdtype(np_dtype, np.integer) and np.issubdtype(value.dtype, np.floating):
        if not np.all(np.isfinite(value)):
            raise RunnerError(f"op {op.name!r} ({op.op_type}) produced non-finite values for an integer output")
    value = value.astype(np_dtype, copy=False)
    declared = tuple(var.shape) if var.shape is not None else ()
    if _is_static(declared) and value.shape != declared:
        raise RunnerError(
            f"op {op.name!r} ({op.op_type}) produced shape {value.shape} for {var.name!r}, "
            f"the program declares {declared}"
        )
    return value


def _widen(value: Any) -> Any:
    # fp16 operands are computed in fp32 and the result rounded once to the declared dtype;
    # numpy's own fp16 matmul/conv would be slow and round inside the accumulation.
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.float16):
        return np.float32(value)
    return value


#: op type -> the input it only copies values from (no arithmetic): left in fp16, so a gather
#: from an embedding table widens the rows it takes, not the whole table (MiniLM: 11.7M values).
_GATHERED = {"gather": "x", "gather_nd": "x", "gather_along_axis": "x"}


def _value_of(var, env: dict[str, Any]) -> Any:
    if var.name in env:
        return env[var.name]
    if var.val is not None:  # a constant the loader inlined instead of emitting a const op
        return np.asarray(var.val)
    raise RunnerError(f"variable {var.name!r} is used before any op produced it")


def _evaluate(op, env: dict[str, Any]) -> None:
    fn = OPS.get(op.op_type)
    if fn is None or op.blocks:
        raise UnsupportedOpError(op.op_type, op.name)
    args: dict[str, Any] = {}
    keep = _GATHERED.get(op.op_type)
    for name, var in op.inputs.items():
        if isinstance(var, (list, tuple)):
            args[name] = [_widen(_value_of(v, env)) for v in var]
        elif name == keep:
            args[name] = _value_of(var, env)
        else:
            args[name] = _widen(_value_of(var, env))
    result = fn(op, args)
    results = result if isinstance(result, tuple) else (result,)
    if len(results) != len(op.outputs):
        raise RunnerError(
            f"op {op.name!r} ({op.op_type}) gave {len(results)} results for {len(op.outputs)} outputs"
        )
    for var, value in zip(op.outputs, results):
        env[var.name] = _to_declared(value, var, op)


def run(
    model: ModelLike,
    inputs: Mapping[str, np.ndarray],
    *,
    function: str = "main",
    intermediates: bool = False,
) -> dict[str, np.ndarray]:
    """Execute ``model``'s ``function`` on ``inputs`` with numpy; return its outputs by name.

    ``model`` is a path to a saved ``.mlpackage``, a ``coremltools.models.MLModel`` or a
    loaded MIL ``Program`` (see :func:`~quanta.mil.program.load_program`;
    load once with it when running a model many times). ``inputs`` maps every input name
    of the function to an array of its declared shape; each is cast to the declared dtype
    (e.g. fp16). Outputs keep their declared dtype (fp16 at iOS16+ unless the model was
    converted with fp32 outputs). With ``intermediates=True`` the dict also holds every
    variable the ops produced, by variable name.

    Raises ``UnsupportedOpError`` naming the first op type the runner does not implement
    (before computing anything), ``RunnerError`` on a missing or misshapen input or a
    result that disagrees with the program's declared shape.
    """
    program = load_program(model)
    if function not in program.functions:
        raise KeyError(f"no function {function!r} in the program (has {sorted(program.functions)})")
    return run_function(program.functions[function], inputs, intermediates=intermediates)


def run_function(func: Any, inputs: Mapping[str, np.ndarray], *, intermediates: bool = False) -> dict[str, np.ndarray]:
    """:func:`run` for one MIL ``Function`` (``program.functions[name]``), also one a graph pass is
    working on (the coreml exporter's per-op precision choice runs the float32 program that way)."""
    for op in func.operations:  # refuse up front, not half way through a long model
        if op.op_type not in OPS or op.blocks:
            raise UnsupportedOpError(op.op_type, op.name)

    missing = sorted(set(func.inputs) - set(inputs))
    unknown = sorted(set(inputs) - set(func.inputs))
    if missing or unknown:
        raise RunnerError(
            f"inputs do not match the program: missing {missing}, unknown {unknown} "
            f"(expects {sorted(func.inputs)})"
        )
    env: dict[str, Any] = {}
    for name, var in func.inputs.items():
        value = np.asarray(inputs[name])
        declared = tuple(var.shape)
        if _is_static(declared) and value.shape != declared:
            raise RunnerError(f"input {name!r} has shape {value.shape}, the program declares {declared}")
        env[name] = value.astype(declared_numpy_dtype(var))

    for op in func.operations:
        _evaluate(op, env)

    outputs = {var.name: env[var.name] for var in func.outputs}
    if intermediates:
        return {**env, **outputs}
    return outputs


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Numeric agreement of ``a`` (e.g. the runner's output) with reference ``b`` (e.g. torch's).

    Both are flattened and compared in float64; shapes must match (``ValueError``).
    Returns ``max_abs`` = max |a - b|; ``max_rel`` = ``max_abs / max |b|`` (relative to the
    reference's range: an element-wise ratio explodes near zero); ``cosine`` = cosine
    similarity of the flattened arrays (1.0 when both are all zero, 0.0 when only one is).
    Any NaN in either array makes all three NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {a.shape} and {b.shape}")
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    if np.isnan(a).any() or np.isnan(b).any():
        return {"max_abs": float("nan"), "max_rel": float("nan"), "cosine": float("nan")}
    a, b = a.ravel(), b.ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        max_abs = float(np.max(np.abs(a - b)))
        scale = float(np.max(np.abs(b)))
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0 and nb == 0:
            cosine = 1.0
        elif na == 0 or nb == 0:
            cosine = 0.0
        else:
            cosine = float(np.dot(a, b) / (na * nb))
    return {"max_abs": max_abs, "max_rel": max_rel, "cosine": cosine}
